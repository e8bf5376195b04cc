"""Big request bodies take turns being decoded: one per event-loop iteration.

Decoding a large JSON body holds the event loop for as long as it takes (a ResNet-50 image as
JSON floats, 3 MB, takes 12-20 ms here; orjson holds the GIL, so a thread does not help). Each
request is its own task, and the tasks whose bodies arrived together all run in the same loop
iteration: eight such bodies after one batch's answers went out hold the loop for well over a
hundred milliseconds, while timers, I/O and the event-loop lag probe wait. The probe then reads
overload and the server sheds requests of a load it was carrying.

With turns, a task that has a big body to decode waits until no other big decode has run in
the current iteration. Between two big decodes the loop starts a new iteration, so its timers
and I/O run in between: the loop is late by at most one body's decode, however many arrive at
once. Small bodies never wait (they do not use the turns at all).
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

# A body at least this large takes a turn (1 MiB of JSON decodes in a few milliseconds).
BIG_BODY_BYTES = 1 << 20


class DecodeTurns:
    """`async with turns:` around one big decode. Holders come one per loop iteration, first
    come first served; the turn passes on at the start of the next iteration."""

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._pass_on()  # the turn was handed to this task just as it was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Not now: the next holder would decode in this same iteration. call_soon runs in the
        # next one, after the timers that fell due meanwhile.
        asyncio.get_running_loop().call_soon(self._pass_on)

    def _pass_on(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the turn goes to it: `_busy` stays True
                return
        self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)
