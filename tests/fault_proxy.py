"""A fault-injecting HTTP proxy on loopback, in front of a real S3 endpoint (moto's server).

It forwards every request byte for byte (the raw request target, so keys with ``%``, ``+``, ``#``... pass
as the client encoded them) and, for the requests a rule picks, answers instead:

- ``"503"``: ``503 SlowDown`` (S3's throttling answer); ``"500"``: ``500 InternalError``;
- ``"403"``: ``403 AccessDenied``; ``"expired"``: ``400 ExpiredToken`` (session credentials ran out);
- ``"reset"``: a TCP reset before any response;
- ``"truncate"``: the real status and headers, half the body, then a reset;
- ``"drop"``: forwards the request (the server acts on it), then resets instead of answering: a lost
  response, which the client retries;
- ``"delay"``: sleeps ``delay_s`` before forwarding.

Use it through the ``fault_proxy`` fixture below (``pytest_plugins = ["fault_proxy"]`` in the test module)::

    def test_reads_heal(fault_proxy, s3_bucket):
        fault_proxy.set_faults(rate=0.3, kinds=("503", "reset"), methods=("GET",))
        config = StorageConfig(s3_endpoint=fault_proxy.url)     # the library through the proxy
        ...
        assert fault_proxy.injected["503"] > 0

Everything bitray sends to S3 goes through the proxy once its endpoint is the proxy's: boto3 (listing,
reads, leases) and pyarrow's S3FileSystem (Parquet writes) both take ``StorageConfig.s3_endpoint``. For an
end-to-end pipeline test, pass ``StorageConfig(s3_endpoint=fault_proxy.url)`` in the run's config
(Ray workers get it with the config), or set ``AWS_ENDPOINT_URL_S3=fault_proxy.url`` before Ray starts:
Ray workers see only the environment they were started with, so a session-wide Ray started earlier keeps
the plain moto endpoint. Seed the data through ``fault_proxy.upstream`` (moto itself) so setup never
meets a fault, and restrict faults to GETs of images with ``match=lambda method, path: "/photos/" in path``
so listing and output writes stay clean unless the test wants them faulty. ``fault_proxy.seen`` counts
requests per method, e.g. to prove a code path made no GET.
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

KINDS = ("503", "500", "403", "expired", "reset", "truncate", "drop", "delay")

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
    "expired": (400, "ExpiredToken", "The provided token has expired."),
}


class FaultProxy:
    """A threaded proxy on 127.0.0.1 in front of ``upstream``; ``url`` is its endpoint."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self.rate = 0.0
        self.kinds: tuple[str, ...] = ()
        self.methods: frozenset[str] = frozenset()
        self.match: Callable[[str, str], bool] | None = None
        self.delay_s = 0.2
        self._queued: collections.deque[tuple[str, str, Callable[[str, str], bool] | None]] = (
            collections.deque()
        )
        self.injected: collections.Counter[str] = collections.Counter()
        self.seen: collections.Counter[str] = collections.Counter()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def set_faults(
        self,
        *,
        rate: float,
        kinds: Iterable[str] = ("503", "500", "reset", "truncate", "delay"),
        methods: Iterable[str] = ("GET",),
        match: Callable[[str, str], bool] | None = None,
        delay_s: float = 0.2,
        seed: int = 0,
    ) -> None:
        """Answer a fraction ``rate`` of the requests with these methods (and ``match(method, path)``)
        with one of ``kinds``, chosen at random (seeded)."""
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        assert not unknown, f"unknown fault kinds {unknown}; use {KINDS}"
        with self._lock:
            self.rate, self.kinds, self.methods = rate, kinds, frozenset(m.upper() for m in methods)
            self.match, self.delay_s, self._rng = match, delay_s, random.Random(seed)

    def fail_next(self, kind: str, *, method: str = "GET", match: Callable[[str, str], bool] | None = None):
        """Answer the next request with ``method`` (and ``match``) with ``kind``, once."""
        assert kind in KINDS, kind
        with self._lock:
            self._queued.append((kind, method.upper(), match))

    def clear(self) -> None:
        with self._lock:
            self.rate, self.kinds, self.match = 0.0, (), None
            self._queued.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            self.seen[method] += 1
            for i, (kind, wanted, match) in enumerate(self._queued):
                if wanted == method and (match is None or match(method, path)):
                    del self._queued[i]
                    self.injected[kind] += 1
                    return kind
            if not self.kinds or method not in self.methods:
                return None
            if self.match is not None and not self.match(method, path):
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.injected[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.owner._choose(self.command, self.path)
        if kind == "reset":
            return self._reset()
        if kind in _ERRORS:
            return self._error(*_ERRORS[kind])
        if kind == "delay":
            time.sleep(self.owner.delay_s)
        status, reason, headers, payload = self._forward(body)
        if kind == "drop":
            return self._reset()
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        length = next((v for n, v in headers if n.lower() == "content-length"), str(len(payload)))
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "truncate" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.owner._host, self.owner._port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        payload = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
            "</Message><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


@pytest.fixture()
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the session's moto server, injecting nothing until told to
    (``set_faults`` / ``fail_next``). Load it with ``pytest_plugins = ["fault_proxy"]`` in a test module."""
    proxy = FaultProxy(s3_server)
    yield proxy
    proxy.close()
