"""A queued completion and the events the worker sends back to its request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Event:
    """What the worker tells a request: a text `delta`, `done` with a finish reason, or an `error`."""

    kind: Literal["delta", "done", "error"]
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """One queued completion: its prompt, sampling settings, where its events go, and a cancel flag."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    emit: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    heard: bool = False  # it got an event: a retry would repeat text it already has
    answered: bool = False  # it got its last event (done or error)

    def send(self, event: Event) -> None:
        """Pass `event` to the request, remembering how far its answer has got."""
        self.heard = True
        self.answered = event.kind != "delta"
        self.emit(event)
