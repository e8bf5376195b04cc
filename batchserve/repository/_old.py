"""The set of served models, looked up by name and version."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType

from batchserve.engine import Engine
from batchserve.errors import ModelNotFound


class ModelRepository:
    """Owns the engines it serves: entering it starts them all, leaving it drains and stops them."""

    def __init__(self, engines: list[Engine]) -> None:
        self._engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.name in self._engines:
                raise ValueError(f"two models are named {engine.name!r}")
            self._engines[engine.name] = engine
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> ModelRepository:
        async with contextlib.AsyncExitStack() as stack:
            for engine in self._engines.values():
                await stack.enter_async_context(engine)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def get(self, name: str, version: str | None = None) -> Engine:
        engine = self._engines.get(name)
        if engine is None:
            raise ModelNotFound(f"unknown model {name!r}")
        if version is not None and version != engine.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        return engine

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines.values())

    @property
    def ready(self) -> bool:
        return all(engine.ready for engine in self._engines.values())
