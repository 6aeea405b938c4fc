"""The daemon's HTTP server: `/healthz`, `/metrics` and the webhook endpoints.

A small threaded `http.server`: Prometheus and the webhook senders are the only clients, and
none of them needs more. Bodies are capped (`MAX_BODY`); each request runs on its own thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sync.metrics import CONTENT_TYPE
from sync.webhooks import Reply

log = logging.getLogger("trackloop.http")

MAX_BODY = 1 << 20  # GitHub caps payloads at 25 MB but issue events are a few kB; 1 MB is plenty


class Routes:
    """What the server asks the daemon for."""

    def __init__(
        self,
        *,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: Callable[[], bytes],
        webhook: Callable[[str, dict[str, str], dict[str, str], bytes], Reply],
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.webhook = webhook


class HttpServer:
    def __init__(self, host: str, port: int, routes: Routes) -> None:
        handler = _handler(routes)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="trackloop-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self.thread.start()
        log.info("serving /healthz, /metrics and webhooks on http://%s", self.address,
                 extra={"fields": {"event": "http", "address": self.address}})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(routes: Routes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "trackloop"
        sys_version = ""

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc, ensure_ascii=False).encode() + b"\n", "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urlsplit(self.path).path
            try:
                if path == "/healthz":
                    ok, doc = routes.health()
                    self._json(200 if ok else 503, doc)
                elif path == "/metrics":
                    self._send(200, routes.metrics(), CONTENT_TYPE)
                elif path.startswith("/webhooks/"):
                    self._json(405, {"error": "webhooks take POST"})
                else:
                    self._json(404, {"error": f"no such path {path}"})
            except Exception:  # a bug must answer 500, never kill the server thread
                log.exception("GET %s failed", path)
                self._json(500, {"error": "internal error"})

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if not parts.path.startswith("/webhooks/"):
                self._json(404, {"error": f"no such path {parts.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self.close_connection = True
                self._json(413, {"error": f"body must be 0..{MAX_BODY} bytes"})
                return
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            source = parts.path[len("/webhooks/"):].strip("/")
            try:
                reply = routes.webhook(source, headers, query, body)
            except Exception:
                log.exception("webhook %s failed", source)
                self._json(500, {"error": "internal error"})
                return
            self._json(reply.status, reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
