"""A fault-injecting HTTP proxy on 127.0.0.1 for the API teacher's tests.

`FaultProxy(upstream_base_url, faults={request number: Fault})` forwards every request to the
upstream server (a real OpenAI-compatible one) except those the script names, which it answers
itself: 429 with an optional Retry-After, 500 (or any status, with a message that may echo the
request's Authorization header), a stall past the client's timeout (the connection is held
silent, then closed), or a dropped connection (closed without a response). Requests are
numbered from 1 in the order they arrive. It records every arrival (time, body digest, the
fault injected, the body and headers: in memory only) and counts the requests it forwarded and the
faults it injected by kind.

`expand_n=True` makes the upstream behave like vLLM for `n` (llama-cpp-python's server answers
one choice whatever `n` is): a request with n > 1 is sent upstream as n requests with n = 1 and
seed + j (vLLM seeds choice j with seed + j), and the answers are merged into one response
with choices 0..n-1 and the summed usage.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import http.server
import json
import socket
import threading
import time
import urllib.parse

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
                "proxy-connection", "upgrade"}


@dataclasses.dataclass(frozen=True)
class Fault:
    """What the proxy does instead of forwarding one request."""

    kind: str  # "429", "500", "status", "stall" or "drop"
    retry_after: str | None = None  # 429: the Retry-After header's value, if any
    status: int = 500  # "status": the HTTP status to answer
    message: str = "injected by the test proxy"  # error message; {authorization} is replaced
    seconds: float = 0.0  # "stall": how long to hold the connection silent before closing it


@dataclasses.dataclass
class Arrival:
    """One request the proxy received."""

    number: int
    received: float  # time.monotonic() when its body was read
    body: bytes
    body_digest: str  # SHA-256 of the body: a retried request has the same one
    headers: dict[str, str]
    fault: str | None = None  # Fault.kind injected, None when forwarded
    answered: float | None = None  # time.monotonic() when the answer was sent


class FaultProxy:
    """The proxy (see the module docstring); a context manager that serves on a free port."""

    def __init__(self, upstream: str, faults: dict[int, Fault] | None = None, *,
                 expand_n: bool = False):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.path_prefix = parsed.path.rstrip("/")
        self.faults = dict(faults or {})
        self.expand_n = expand_n
        self.arrivals: list[Arrival] = []
        self.forwarded = 0  # requests answered by the upstream server
        self.upstream_requests = 0  # requests sent upstream (more than forwarded with expand_n)
        self.injected: collections.Counter = collections.Counter()  # by Fault.kind
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.path_prefix}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _arrive(self, body: bytes, headers) -> tuple[Arrival, Fault | None]:
        with self._lock:
            arrival = Arrival(number=len(self.arrivals) + 1, received=time.monotonic(),
                              body=body, body_digest=hashlib.sha256(body).hexdigest(),
                              headers={k.lower(): v for k, v in headers.items()})
            fault = self.faults.get(arrival.number)
            if fault is not None:
                arrival.fault = fault.kind
                self.injected[fault.kind] += 1
            self.arrivals.append(arrival)
        return arrival, fault

    def upstream(self, method: str, path: str, body: bytes, headers) -> tuple[int, list, bytes]:
        """(status, headers, body) of one request sent to the upstream server."""
        with self._lock:
            self.upstream_requests += 1
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port,
                                                timeout=300)
        try:
            kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            connection.request(method, path, body=body, headers=kept)
            response = connection.getresponse()
            content = response.read()
            kept_back = [(k, v) for k, v in response.getheaders()
                         if k.lower() not in _HOP_HEADERS | {"server", "date"}]
            return response.status, kept_back, content
        finally:
            connection.close()

    def expanded(self, path: str, body: bytes, headers) -> tuple[int, list, bytes]:
        """A request with n > 1 answered as vLLM would: n upstream requests, seed + j."""
        request = json.loads(body)
        n = int(request.get("n") or 1)
        if n <= 1:
            return self.upstream("POST", path, body, headers)
        merged, choices, usage = None, [], collections.Counter()
        for j in range(n):
            single = dict(request, n=1)
            if request.get("seed") is not None:
                single["seed"] = request["seed"] + j
            status, back_headers, content = self.upstream("POST", path,
                                                          json.dumps(single).encode(), headers)
            if status != 200:
                return status, back_headers, content
            answer = json.loads(content)
            merged = merged or (back_headers, answer)
            choices.append(dict(answer["choices"][0], index=j))
            usage.update({k: v for k, v in (answer.get("usage") or {}).items()
                          if isinstance(v, int)})
        back_headers, answer = merged
        usage["prompt_tokens"] = answer["usage"]["prompt_tokens"]  # one prompt, as vLLM counts
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        answer = dict(answer, choices=choices, usage=dict(usage))
        return 200, back_headers, json.dumps(answer).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one connection for `proxy` (set by `_handler_class`)."""

    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, *args) -> None:
        pass  # silent: nothing the proxy sees reaches a log

    def do_GET(self) -> None:
        self._forward(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._forward(self.rfile.read(length))

    def _forward(self, body: bytes) -> None:
        arrival, fault = self.proxy._arrive(body, self.headers)
        if fault is not None:
            self._inject(fault, arrival)
            return
        if self.proxy.expand_n and self.command == "POST":
            status, headers, content = self.proxy.expanded(self.path, body, self.headers)
        else:
            status, headers, content = self.proxy.upstream(self.command, self.path, body,
                                                           self.headers)
        with self.proxy._lock:
            self.proxy.forwarded += 1
        self._answer(status, headers, content, arrival)

    def _inject(self, fault: Fault, arrival: Arrival) -> None:
        if fault.kind in ("stall", "drop"):
            if fault.kind == "stall":
                self.proxy._closing.wait(fault.seconds)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the client may have given up and closed it first
            arrival.answered = time.monotonic()
            return
        status = {"429": 429, "500": 500}.get(fault.kind, fault.status)
        message = fault.message.replace("{authorization}",
                                        self.headers.get("Authorization", ""))
        headers = [("Content-Type", "application/json")]
        if fault.retry_after is not None:
            headers.append(("Retry-After", fault.retry_after))
        content = json.dumps({"error": {"message": message, "type": "injected",
                                        "code": status}}).encode()
        self._answer(status, headers, content, arrival)

    def _answer(self, status: int, headers, content: bytes, arrival: Arrival) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        self.wfile.flush()
        arrival.answered = time.monotonic()


def _handler_class(proxy: FaultProxy) -> type:
    return type("Handler", (_Handler,), {"proxy": proxy})
