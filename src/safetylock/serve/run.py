"""Running the server: the admin token, serving until interrupted, and serving on a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import SafetylockError
from .api import MAX_BODY_BYTES
from .app import create_app
from .engine import Engine


def read_admin_token(token: str | None, token_file: Path | None) -> str | None:
    """Return the admin token given directly or read (stripped) from `token_file`; None when neither is given.

    A file keeps the token out of the process list and shell history; a missing, unreadable or empty file is
    an error rather than a server that silently runs without admin.
    """
    if token_file is None:
        return token or None
    if token is not None:
        raise SafetylockError("give the admin token (--admin-token or SAFETYLOCK_ADMIN_TOKEN) or --admin-token-file, "
                              "not both")
    try:
        text = Path(token_file).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SafetylockError(f"cannot read the admin token file {token_file} ({type(exc).__name__}: {exc})") from None
    if not text:
        raise SafetylockError(f"the admin token file {token_file} is empty; put the token on its first line")
    if "\n" in text:  # a header carries one line: a many-line token could never match
        raise SafetylockError(f"the admin token file {token_file} has more than one line; keep only the token")
    return text


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, admin_token: str | None = None,
          admin_token_file: Path | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          log_level: str = "warning") -> None:
    """Serve `engine` over HTTP until interrupted, then stop its worker."""
    import uvicorn

    try:
        app = create_app(engine, admin_token=read_admin_token(admin_token, admin_token_file),
                         max_body_bytes=max_body_bytes)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()


@contextlib.contextmanager
def serve_in_thread(engine: Engine, *, host: str = "127.0.0.1", port: int = 0, admin_token: str | None = None,
                    max_body_bytes: int = MAX_BODY_BYTES) -> Iterator[str]:
    """Yield the base URL of `engine` served on a background thread; port 0 picks a free port."""
    import uvicorn

    app = create_app(engine, admin_token=admin_token, max_body_bytes=max_body_bytes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SafetylockError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
