"""A server on a background thread of this process (tests, benchmarks and the screenshot script use it): the
same app ``knnformer serve`` runs, bound to 127.0.0.1 on a free port."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """``with BackgroundServer(service) as url:`` serves ``service`` (server.open_service) until the block ends."""

    def __init__(self, service, port: int | None = None):
        import uvicorn

        from knnformer.serve.server import create_app

        self.service, self.port = service, port or free_port()
        config = uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="knnformer-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on port {self.port}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()
