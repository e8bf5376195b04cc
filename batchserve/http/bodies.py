"""Request bodies at the HTTP boundary: which content codings are taken, how a body that cannot
be decoded is refused, and `Expect: 100-continue` answered only after the checks the headers
allow (RFC 9110 §10.1.1), so a refused client never uploads its body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from batchserve.errors import BatchserveError, InvalidInput, UnsupportedMediaType

# Decoded by aiohttp with the standard library alone. `br` and `zstd` need optional modules
# and would make what the server accepts depend on what happens to be installed.
CONTENT_CODINGS = ("gzip", "deflate")
ACCEPT_ENCODING = ", ".join(CONTENT_CODINGS)
_TAKEN = frozenset((*CONTENT_CODINGS, "identity"))


class UnsupportedContentEncoding(UnsupportedMediaType):
    """415 with `Accept-Encoding` naming the codings that would be taken (RFC 9110 §15.5.16)."""

    headers: Mapping[str, str] = {"Accept-Encoding": ACCEPT_ENCODING}


class ExpectationFailed(BatchserveError):
    status = 417


def check_content_encoding(headers: Mapping[str, str]) -> None:
    """One coding of the taken ones (or none); anything else would reach the decoder as
    compressed bytes or fail inside it."""
    value = headers.get("Content-Encoding")
    if value is None:
        return
    coding = value.strip().lower()
    if coding not in _TAKEN:
        raise UnsupportedContentEncoding(
            f"Content-Encoding {value[:64]!r} is not supported; use one of: {ACCEPT_ENCODING}"
        )


def client_error(err: BaseException) -> BatchserveError | None:
    """Foreign errors a client's body causes, as the errors they are (400), else None."""
    if isinstance(err, RequestPayloadError):
        cause = err.__cause__ or err
        detail = str(getattr(cause, "message", "") or cause).strip()
        return InvalidInput(
            "the request body could not be read or decoded"
            + (f": {detail.splitlines()[0][:200]}" if detail else "")
        )
    return None


Check = Callable[[web.Request], object]
Refuse = Callable[[web.Request, Exception], web.StreamResponse]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def expect_handler(check: Check, refuse: Refuse) -> ExpectHandler:
    """An aiohttp `expect_handler`: runs `check` (which raises to refuse) before sending
    `100 Continue`; a refusal is the final answer, and the connection closes after it since
    the body the client held back is not coming."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        expect = request.headers.get("Expect", "")
        try:
            if request.version < HttpVersion11:
                return None  # HTTP/1.0 has no Expect: ignored (RFC 9110 §10.1.1)
            if expect.strip().lower() != "100-continue":
                raise ExpectationFailed(f"Expect {expect[:64]!r} is not supported")
            check(request)
        except Exception as err:
            response = refuse(request, err)
            response.force_close()
            return response
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # the 100 is not the response
        return None

    return handle
