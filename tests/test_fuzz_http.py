"""Property-based tests of the HTTP framing against one real server per module: whatever bytes
a client sends (odd headers, content codings, Expect values, pipelined requests, chunked
bodies split anywhere, truncated bodies), every answer is a well-formed status below 500, no
connection hangs past a bounded time, and the server stays live."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchserve import Engine, ServerConfig
from batchserve.app import Server
from batchserve.repository import ModelRepository

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
SOCKET_TIMEOUT_S = 15  # far past every server timeout below: reaching it means a hang
JSON = (
    b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":['
    + b",".join([b"0.5"] * 64)
    + b"]}]}"
)


class ServerThread:
    """A real server on its own event loop in a thread, so synchronous sockets can drive it."""

    def __init__(self, mlp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        config = ServerConfig(
            host="127.0.0.1", port=0, max_body_bytes=1 << 20,
            header_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=1.0,
        )  # fmt: skip
        self.server = Server(ModelRepository([Engine(mlp_path, name="mlp")]), config)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.server.start())

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)  # type: ignore[arg-type]

    def close(self) -> None:
        self._call(self.server.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from batchserve.examples import write_example

    running = ServerThread(write_example("mlp", tmp_path_factory.mktemp("fuzz") / "mlp.onnx"))
    yield running.server.port
    running.close()


class _Statuses:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


def exchange(port: int, data: bytes, *, half_close: bool = True) -> list[int]:
    """Send `data`, read to the server's close; the statuses of every response, which must
    parse as HTTP (a 100 Continue included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early and closed: its answer is still to be read
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread, after its answer
    statuses = _Statuses()
    if received:
        with contextlib.suppress(httptools.HttpParserUpgrade):
            statuses.parser.feed_data(received)
    return statuses.statuses


def live(port: int) -> bool:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    return exchange(port, request, half_close=False) == [200]


token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~", min_size=1, max_size=20
)
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
codings = (
    st.sampled_from(
        [
            "gzip",
            "deflate",
            "br",
            "zstd",
            "identity",
            "GZIP",
            "gzip, deflate",
            "x-gzip",
            "",
            "compress",
        ]
    )
    | header_value
)
expects = st.sampled_from(["100-continue", "100-Continue", "nonsense", ""]) | header_value
paths = st.sampled_from(["/v2/models/mlp/infer", "/v2/models/nope/infer", "/v2/health/live", "/v2"])
# No HEAD: its answers carry no body, which a response parser cannot know on its own.
methods = st.sampled_from(["POST", "GET", "PUT", "DELETE"])


def encode(body: bytes, coding: str) -> bytes:
    if coding.strip().lower() == "gzip":
        return gzip.compress(body)
    if coding.strip().lower() == "deflate":
        return zlib.compress(body)
    return body


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    body = draw(st.sampled_from([JSON, b"", b"{}", b"not json"]) | st.binary(max_size=200))
    coding = draw(st.none() | codings)
    if coding is not None and draw(st.booleans()):
        body = encode(body, coding)
    headers = [("Host", "x")]
    headers += draw(st.lists(st.tuples(token, header_value), max_size=5))
    if coding is not None:
        headers.append(("Content-Encoding", coding))
    expect = draw(st.none() | expects)
    if expect is not None:
        headers.append(("Expect", expect))
    chunked = draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        payload = body
    head = f"{draw(methods)} {draw(paths)} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode() + b"\r\n" + payload


@pytest.mark.slow
@FUZZ
@given(batch=st.lists(requests(), min_size=1, max_size=3))
def test_pipelined_requests_get_well_formed_answers_below_500(
    port: int, batch: list[bytes]
) -> None:
    statuses = exchange(port, b"".join(batch))
    assert all(100 <= status < 500 for status in statuses), statuses
    assert live(port)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests(), keep=st.floats(0.0, 0.99), half_close=st.booleans())
def test_truncated_requests_are_answered_or_closed_never_hung(
    port: int, request: bytes, keep: float, half_close: bool
) -> None:
    """Without a half close the server's header or body timeout (0.5 s here) ends it."""
    statuses = exchange(port, request[: int(len(request) * keep)], half_close=half_close)
    assert all(100 <= status < 500 for status in statuses), statuses
    assert live(port)
