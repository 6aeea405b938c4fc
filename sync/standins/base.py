"""A loopback HTTP server harness shared by the service stand-ins.

The stand-ins (GitHub REST, Jira REST, Slack Web API) speak the real wire protocol so that the
real client libraries run against them unchanged. This module owns what they have in common:
a threaded server on 127.0.0.1, a request log (tests and benchmarks count requests), fault
injection (429/5xx/timeouts/malformed bodies), and a settable clock. Each stand-in subclasses
`Standin` and implements `handle(request) -> Response`.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the stand-in saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status, json.dumps(payload).encode(), hdrs)


@dataclass(slots=True)
class Fault:
    """Answer matching requests with `status` (or a malformed body / a stall) `times` times."""

    method: str | None
    path_pattern: re.Pattern[str]
    status: int = 502
    times: int = 1  # -1: until cleared
    retry_after: float | None = None
    kind: str = "status"  # status | malformed | timeout | after (handled, then the status: a lost reply)
    delay: float = 0.0

    def matches(self, req: Request) -> bool:
        if self.times == 0:
            return False
        if self.method and self.method != req.method:
            return False
        return bool(self.path_pattern.search(req.path))


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int


class Standin:
    """Base class: run with `with SomeStandin() as s: s.base_url`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log: list[LoggedRequest] = []
        self.faults: list[Fault] = []
        self._now: datetime | None = None
        self.latency = 0.0  # seconds added to every answer, like a real API's round trip
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- clock -----------------------------------------------------------------------------
    def now(self) -> datetime:
        """The stand-in's current time (UTC, second precision); settable with `set_now`."""
        with self.lock:
            return self._now or datetime.now(UTC).replace(microsecond=0)

    def set_now(self, when: datetime | None) -> None:
        with self.lock:
            self._now = when

    # -- faults ----------------------------------------------------------------------------
    def inject(
        self,
        path_pattern: str,
        *,
        status: int = 502,
        times: int = 1,
        method: str | None = None,
        retry_after: float | None = None,
        kind: str = "status",
        delay: float = 0.0,
    ) -> Fault:
        fault = Fault(method, re.compile(path_pattern), status, times, retry_after, kind, delay)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def fault_response(self, fault: Fault, req: Request) -> Response:
        """How an injected status looks on this service; stand-ins override for their envelope."""
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        return Response.json({"message": f"injected {fault.status}"}, fault.status, headers)

    # -- request log -----------------------------------------------------------------------
    def requests(self, method: str | None = None, path_pattern: str | None = None) -> list[LoggedRequest]:
        pattern = re.compile(path_pattern) if path_pattern else None
        with self.lock:
            return [
                r
                for r in self.log
                if (method is None or r.method == method) and (pattern is None or pattern.search(r.path))
            ]

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()

    # -- serving ---------------------------------------------------------------------------
    def handle(self, req: Request) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dispatch(self, req: Request) -> Response:
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            fault = next((f for f in self.faults if f.matches(req)), None)
            if fault is not None and fault.times > 0:
                fault.times -= 1
        if fault is not None:
            if fault.kind == "timeout":
                time.sleep(fault.delay or 30)
                return Response.json({"message": "late"}, 504)
            if fault.kind == "after":
                self.handle(req)
                return self.fault_response(fault, req)
            if fault.kind == "malformed":
                return Response(200, b'{"truncated": ', {"Content-Type": "application/json"})
            return self.fault_response(fault, req)
        return self.handle(req)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "stand-in not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle on, the body waits for the client's
            # delayed ACK (~40 ms) on every keep-alive request.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                try:
                    resp = standin._dispatch(req)
                except Exception as exc:  # a stand-in bug must show up as a 500, not a hang
                    resp = Response.json({"message": f"stand-in error: {exc!r}"}, 500)
                with standin.lock:
                    standin.log.append(
                        LoggedRequest(req.method, req.path, req.query, req.headers, resp.status)
                    )
                self.send_response(resp.status)
                for name, value in resp.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(resp.body)))
                self.end_headers()
                if self.command != "HEAD" and resp.status not in (204, 304):
                    self.wfile.write(resp.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Standin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer (a killed daemon, a timeout) is not the stand-in's error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


Route = Callable[[Request, "re.Match[str]"], Response]


class Router:
    """Tiny regex router: `router.add("GET", r"/repos/(?P<owner>[^/]+)/...", fn)`."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Route]] = []

    def add(self, method: str, pattern: str, fn: Route) -> None:
        self.routes.append((method, re.compile(pattern + r"\Z"), fn))

    def dispatch(self, req: Request) -> Response | None:
        for method, pattern, fn in self.routes:
            if method == req.method and (m := pattern.match(req.path)):
                return fn(req, m)
        return None
