"""The FastAPI app: OpenAI's chat-completions routes, admin adapter loading, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from these globals
from pydantic import ValidationError

from ..errors import SafetylockError
from .api import DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, AdapterRequest, ApiError, ChatRequest
from .engine import Engine
from .jobs import Event, Job
from .metrics import Metrics


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """Return the request body, answering 413 for one over `limit` bytes before buffering more than that."""
    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # a chunked body declares no length: count what arrives
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _event_stream(events: AsyncIterator[str], on_close: Callable[[], None]) -> Any:
    """Return a server-sent-event response that runs `on_close` however it ends (done, error or hang-up)."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            except (ClientDisconnect, OSError):
                pass
            finally:
                on_close()
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]

    return EventStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _CountResponses:
    """ASGI middleware that counts responses by status code (it leaves streams untouched)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, admin_token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """Return the FastAPI app serving `engine` with OpenAI's chat-completions API.

    The lock's settings (alpha, fingerprint, baked parameters, mode) are shown only to a request whose
    `Authorization: Bearer` header carries `admin_token`; any other request, and every request when no admin
    token is configured, gets the public view: `/health` says only its status, `/v1/models` lists the model
    ids with `"locked": true`. A wrong token on these read-only routes just gets the public view (OpenAI
    clients send their API key there); `/admin/adapters` answers 404 without a configured token, 401 without
    a Bearer header and 403 for a wrong token. `/metrics` holds traffic counters only, no lock settings, and
    stays public for scrapers and `serve-bench`. Bodies over `max_body_bytes` get 413 before they are parsed.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_body_bytes < 1:
        raise SafetylockError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    app = FastAPI(title="safetylock", docs_url=None, redoc_url=None)
    metrics = engine.metrics
    app.add_middleware(_CountResponses, metrics=metrics)
    secret = (admin_token or "").encode()

    def bearer(request: Request) -> str | None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return given.strip() if scheme.lower() == "bearer" else None

    def is_admin(request: Request) -> bool:
        given = bearer(request)
        return bool(secret) and given is not None and hmac.compare_digest(given.encode(), secret)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:  # answered, logged, and the server goes on
        return error(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(ApiError(400, f"invalid request: {exc.errors()[0].get('msg', 'bad field')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        status = {"status": "ok" if engine.lock_intact() else "lock-damaged"}
        if not is_admin(request):  # public liveness: nothing about the lock an attacker could tune against
            return status
        return {**status, "model": engine.name, "adapters": list(engine.adapters), "lock": engine.lock_info(),
                "queue_depth": len(engine._pending)}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        if request.query_params.get("format") == "json" or "application/json" in request.headers.get("accept", ""):
            return JSONResponse(metrics.snapshot())
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        created = int(metrics.started)
        lock = engine.lock_info() if is_admin(request) else {"locked": True}
        data = [{"id": n, "object": "model", "created": created, "owned_by": "safetylock",
                 "root": engine.name, "parent": None if n == engine.name else engine.name,
                 "safetylock": lock} for n in engine.names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        try:
            body = json.loads(await _read_body(request, max_body_bytes))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            raise ApiError(400, f"invalid '{param}': {first.get('msg')}", param=param or None) from None
        if req.model not in engine.names:
            raise ApiError(404, f"the model '{req.model}' does not exist; served: {', '.join(engine.names)}",
                           code="model_not_found", param="model")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = engine.encode(messages)
        except Exception as exc:  # chat templates raise on role orders they do not support
            raise ApiError(400, f"the messages do not fit the model's chat template ({str(exc)[:200]})",
                           param="messages") from None
        if len(prompt_ids) > engine.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{engine.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        room = engine.context_length - len(prompt_ids)
        limit = req.limit()
        if limit is not None and limit > room:
            raise ApiError(400, f"this model's context is {engine.context_length} tokens: {len(prompt_ids)} in the "
                           f"prompt leaves {room} for the reply, but {limit} were asked",
                           code="context_length_exceeded", param="max_tokens")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(req.model, prompt_ids, limit or min(DEFAULT_MAX_TOKENS, room), req.temperature, req.top_p,
                  req.seed, list(req.stop or []), emit)
        engine.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        usage = lambda n: {"prompt_tokens": len(prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt_ids) + n}

        if not req.stream:
            parts: list[str] = []
            first_token: float | None = None
            try:
                while (event := await queue.get()).kind == "delta":
                    first_token = first_token or time.perf_counter() - started
                    parts.append(event.text)
            finally:
                job.cancelled.set()
            if event.kind == "error":
                raise ApiError(500, event.text, kind="server_error")
            metrics.served(time.perf_counter() - started, first_token, len(prompt_ids), event.completion_tokens)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "logprobs": None, "finish_reason": event.finish_reason}],
                    "usage": usage(event.completion_tokens), "system_fingerprint": None}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state = {"finished": False}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def events() -> AsyncIterator[str]:
            first_token: float | None = None
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while (event := await queue.get()).kind == "delta":
                first_token = first_token or time.perf_counter() - started
                yield _sse(chunk({"content": event.text}))
            state["finished"] = True
            if event.kind == "error":
                yield _sse(ApiError(500, event.text, kind="server_error").body())
            else:
                metrics.served(time.perf_counter() - started, first_token, len(prompt_ids), event.completion_tokens)
                yield _sse(chunk({}, event.finish_reason))
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": usage(event.completion_tokens)})
            yield _sse("[DONE]")

        def on_close() -> None:
            if not state["finished"]:
                metrics.add(disconnects=1)
            job.cancelled.set()

        return _event_stream(events(), on_close)

    @app.post("/admin/adapters", include_in_schema=bool(secret))
    async def add_adapter(request: Request) -> Any:
        if not secret:
            raise ApiError(404, "not found", code="not_found")
        if bearer(request) is None:
            raise ApiError(401, "this endpoint needs 'Authorization: Bearer <admin token>'", code="invalid_api_key",
                           kind="authentication_error")
        if not is_admin(request):
            raise ApiError(403, "the admin token is wrong", code="forbidden", kind="permission_error")
        try:
            req = AdapterRequest.model_validate(json.loads(await _read_body(request, max_body_bytes)))
        except (ValueError, ValidationError) as exc:
            raise ApiError(400, f"expected {{\"name\": ..., \"path\": ...}} ({str(exc).splitlines()[0][:120]})") from None
        if req.name in engine.names:
            raise ApiError(409, f"a model named '{req.name}' is already served", code="conflict", param="name")
        try:
            await run_in_threadpool(engine.add_adapter, req.name, req.path)
        except SafetylockError as exc:
            raise ApiError(422 if "does not fit" in str(exc) or "changed the baked lock" in str(exc) else 400,
                           str(exc), code="adapter_rejected", param="path") from None
        return JSONResponse({"id": req.name, "object": "model", "owned_by": "safetylock", "parent": engine.name,
                             "path": engine.adapters[req.name]}, status_code=201)

    return app
