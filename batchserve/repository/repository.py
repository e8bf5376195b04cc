"""The served models and their versions: routing, loading, unloading and hot reload.

Routing (`get`) is on the hot path: a dict lookup and, for models with a traffic split, one
weighted draw. Everything that changes the set of engines runs under one lock, off the hot
path: a new version is started and warmed up before it is published; a version that goes away
is unpublished under the lock, then drained (its in-flight requests finish) and closed outside
it, so one model's slow drain never holds up another model's load.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from batchserve.engine import Engine
from batchserve.errors import BatchserveError, InvalidInput, ModelLoadError, ModelNotFound, NotReady
from batchserve.lifecycle import Lifecycle
from batchserve.repository.config import ModelConfig, TrafficSplit, version_order
from batchserve.repository.source import (
    Fingerprint,
    ModelDirectory,
    file_digest,
    scan_directory,
    scan_model,
)

log = logging.getLogger("batchserve.repository")

# Builds the engine of one version: (model name, version, model file, the model's config).
EngineFactory = Callable[[str, str, Path, ModelConfig], Engine]

READY, LOADING, UNAVAILABLE, UNLOADING = "READY", "LOADING", "UNAVAILABLE", "UNLOADING"
_MODEL_LEVEL = ""  # status key for problems that concern the whole model (its config)
_KEPT = "kept serving: "  # reason of a version kept because its replacement did not load


class RepositoryConflict(BatchserveError):
    """The repository cannot make this change here (409)."""

    status = 409


@dataclass(frozen=True, slots=True)
class VersionStatus:
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Retired:
    """An engine taken out of routing under the lock, to drain and close outside it."""

    model: _Model
    version: str
    engine: Engine
    marker: VersionStatus | None  # its status while it drains; None: it was replaced in place
    after: VersionStatus | None = None  # its status once closed; None: forgotten


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What a published version was loaded from."""

    stat: Fingerprint
    config: str | None  # the digest of config.toml
    digest: str  # of the bytes its engine loaded
    settled: bool  # its file was older than a timestamp tick: the stat alone tells a change


class _Model:
    """One model's routable engines and the routing they imply."""

    __slots__ = ("default", "engines", "fingerprints", "name", "split", "status",
                 "sticky_header", "traffic")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.engines: dict[str, Engine] = {}  # published versions only
        self.status: dict[str, VersionStatus] = {}
        self.fingerprints: dict[str, _Loaded] = {}
        self.traffic: TrafficSplit | None = None
        self.default: Engine | None = None
        self.split: tuple[list[float], list[Engine]] | None = None
        self.sticky_header: str | None = None

    def reroute(self) -> None:
        """Recompute the default (latest) version and the traffic split after a change."""
        ordered = sorted(self.engines, key=version_order)
        self.default = self.engines[ordered[-1]] if ordered else None
        self.split, self.sticky_header = None, None
        if self.traffic is None:
            return
        bounds: list[float] = []
        engines: list[Engine] = []
        total = 0.0
        for version, weight in self.traffic.weights:
            engine = self.engines.get(version)
            if engine is not None and weight > 0:
                total += weight
                bounds.append(total)
                engines.append(engine)
        if len(engines) > 1:
            self.split = ([b / total for b in bounds], engines)
            self.sticky_header = self.traffic.sticky_header
        elif engines:
            self.default = engines[0]  # the only weighted version that is up takes it all

    def choose(self, key: str | None) -> Engine:
        assert self.split is not None
        bounds, engines = self.split
        if key:
            # The same key always lands on the same version while the weights stay the same.
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2.0**64
        else:
            point = random.random()
        return engines[min(bisect.bisect_right(bounds, point), len(engines) - 1)]


class ModelRepository(Lifecycle):
    """Owns the engines it serves: entering it loads them all, leaving it drains and stops them.

    Two forms: a fixed list of engines (`ModelRepository([engine, ...])`, the single-file
    `batchserve serve model.onnx`), or a directory (`ModelRepository.from_directory`) with
    versions, per-model config, hot reload and the load/unload API.

    `shared`: this process is one of several serving the same models (`--workers N`). Each
    has its own repository, so a load or unload would reach only the worker the connection
    landed on: the API refuses them (409) and changes go through the directory and polling.
    """

    def __init__(
        self,
        engines: list[Engine] | None = None,
        *,
        root: Path | None = None,
        factory: EngineFactory | None = None,
        poll_s: float = 0.0,
        drain_timeout_s: float = 30.0,
        shared: bool = False,
    ) -> None:
        self._models: dict[str, _Model] = {}
        self._static: list[Engine] = list(engines or [])
        for engine in self._static:
            model = self._models.setdefault(engine.name, _Model(engine.name))
            if engine.version in model.engines:
                raise ValueError(f"two engines serve {engine.name!r} version {engine.version!r}")
            model.engines[engine.version] = engine
        self._root = root
        self._factory = factory
        self._poll_s = poll_s
        self._drain_timeout_s = drain_timeout_s
        self.shared = shared
        self._lock = asyncio.Lock()
        self._unloaded: set[str] = set()  # explicitly unloaded: polling leaves them alone
        self._seen: dict[str, object] = {}  # last applied directory state per model
        # Bumped by each load/unload: a poll whose scan began before a model's last explicit
        # change must not apply its older view of that model.
        self._generation = 0
        self._changed: dict[str, int] = {}
        self._retiring: set[Engine] = set()  # unpublished, not yet closed
        self._closing: set[asyncio.Task[None]] = set()  # closes that ran past their deadline
        self._poller: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False  # set on exit: no load may start an engine nobody would close
        self._changes: set[asyncio.Task[None]] = set()  # loads and unloads under way
        self.load_failures: dict[str, int] = {}

    @classmethod
    def from_directory(
        cls,
        root: Path,
        factory: EngineFactory,
        *,
        poll_s: float = 0.0,
        drain_timeout_s: float = 30.0,
        shared: bool = False,
    ) -> ModelRepository:
        return cls(
            root=root,
            factory=factory,
            poll_s=poll_s,
            drain_timeout_s=drain_timeout_s,
            shared=shared,
        )

    async def start(self) -> None:
        """Start the fixed engines, or load the directory (and start polling it)."""
        async with contextlib.AsyncExitStack() as stack:
            for engine in self._static:
                await stack.enter_async_context(engine)
            stack.pop_all()
        for model in self._models.values():
            for version in model.engines:
                model.status[version] = VersionStatus(READY)
            model.reroute()
        if self._root is not None:
            if not self._root.is_dir():
                await self._close_all()
                raise ModelLoadError(f"model repository {self._root} is not a directory")
            await self.poll()
            if self._poll_s > 0:
                self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")
        self._started = True

    async def aclose(self) -> None:
        """Stop polling, let loads and unloads under way end, then drain and stop every engine."""
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._changes:  # loads and unloads whose callers may have gone away
            _, late = await asyncio.wait(set(self._changes), timeout=self._drain_timeout_s)
            for task in late:  # a load stuck in a model's code must not hold up the exit
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        async with self._lock:
            await self._close_all()

    async def _close_all(self) -> None:
        retired: list[_Retired] = []
        for model in self._models.values():
            for version in sorted(model.engines, key=version_order, reverse=True):
                self._retire(model, version, retired)
        # Also those a cancelled poll had unpublished but not closed yet.
        leftovers = [e for e in self._retiring if all(r.engine is not e for r in retired)]
        retired += [_Retired(_Model(e.name), e.version, e, None) for e in leftovers]
        await self._finish(retired)
        if self._closing:  # closes that overran: give them one more deadline, no more
            await asyncio.wait(set(self._closing), timeout=self._drain_timeout_s)

    # -- routing (hot path) ----------------------------------------------------------------------

    def get(
        self, name: str, version: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Engine:
        """The engine for a request: the named version, or the model's traffic split (sticky
        on the value of its `sticky_header` in `headers`), or its latest version."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        if version is not None:
            engine = model.engines.get(version)
            if engine is None:
                status = model.status.get(version)
                why = (
                    f" ({status.state.lower()}: {status.reason})"
                    if status and status.reason
                    else ""
                )
                raise ModelNotFound(f"model {name!r} has no version {version!r}{why}")
            return engine
        if model.split is not None:
            key = headers.get(model.sticky_header) if headers and model.sticky_header else None
            return model.choose(key)
        if model.default is None:
            raise NotReady(f"model {name!r} has no version ready{self._reasons(model)}")
        return model.default

    @staticmethod
    def _reasons(model: _Model) -> str:
        problems = [f"{v or 'config'}: {s.reason}" for v, s in model.status.items() if s.reason]
        return f" ({'; '.join(problems)})" if problems else ""

    def __iter__(self) -> Iterator[Engine]:
        """Every published engine (metrics, liveness)."""
        return iter([e for m in list(self._models.values()) for e in list(m.engines.values())])

    def knows(self, name: str) -> bool:
        """Whether `name` is a model of this repository (loaded or not)."""
        return name in self._models

    def versions(self, name: str) -> list[str]:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        return sorted(model.engines, key=version_order)

    @property
    def ready(self) -> bool:
        engines = list(self)
        return self._started and bool(engines) and all(e.ready for e in engines)

    def index(self) -> list[dict[str, str]]:
        """Every known model version and its state (the V2 repository index)."""
        rows: list[dict[str, str]] = []
        for name in sorted(self._models):
            model = self._models[name]
            for version in sorted(model.status, key=version_order):
                status = model.status[version]
                row = {"name": name, "version": version, "state": status.state}
                if status.reason:
                    row["reason"] = status.reason
                rows.append(row)
        return rows

    # -- changes (off the hot path) --------------------------------------------------------------

    async def poll(self) -> None:
        """Scan the directory once and apply what changed (new, changed or removed versions),
        model by model: one model's failure never keeps the others from being applied."""
        if self._root is None:
            return
        generation = self._generation
        try:
            scanned = await asyncio.to_thread(scan_directory, self._root)
        except (OSError, ModelLoadError) as err:
            log.error("cannot scan the model repository: %s", err)
            return
        retired: list[_Retired] = []
        try:
            async with self._lock:
                for name in sorted(set(scanned) | set(self._seen)):
                    if name in self._unloaded or self._changed.get(name, 0) > generation:
                        continue  # left alone, or changed by a load newer than this scan
                    entry = scanned.get(name)
                    state = entry.state if entry is not None else None
                    if self._seen.get(name) != state or await self._drifted(name, entry):
                        await self._apply_one(name, entry, retired)
                        self._seen[name] = state  # even on failure: retried when it changes
        finally:
            await self._finish(retired)

    async def _apply_one(
        self, name: str, entry: ModelDirectory | None, retired: list[_Retired]
    ) -> None:
        try:
            await self._apply(name, entry, retired)
        except Exception as err:  # a bug in one model's code must not stop the others
            reason = f"cannot apply its changes: {type(err).__name__}: {err}"
            log.exception("model %s: %s", name, reason)
            self.load_failures[name] = self.load_failures.get(name, 0) + 1
            model = self._models.get(name)
            if model is not None:
                model.status[_MODEL_LEVEL] = VersionStatus(UNAVAILABLE, reason)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.poll()
            except Exception:  # one bad pass must not end polling
                log.exception("model repository poll failed")

    def _refuse_if_shared(self, action: str) -> None:
        if self.shared:
            raise RepositoryConflict(
                f"cannot {action} through the API: this server runs several worker processes "
                "(--workers), each with its own models, and the call would reach only one of "
                "them; change the model repository directory instead and let "
                "--repository-poll-s apply it in every worker"
            )

    async def _to_the_end(self, change: Coroutine[object, object, None]) -> None:
        """Run a load or unload to its end even when its caller is cancelled (a client that
        disconnects cancels its request): stopped halfway, it would leave a version LOADING
        or UNLOADING for ever and an engine nobody closes."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)
        task.add_done_callback(self._changed_done)
        await asyncio.shield(task)

    def _changed_done(self, task: asyncio.Task[None]) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that went away has nobody to tell

    def _check_open(self) -> None:
        if self._stopping:
            raise NotReady("the model repository is shutting down")

    async def load(self, name: str) -> None:
        """(Re)load a model from the directory (the repository API's load). Raises when the
        model is not in the repository or none of its versions could be loaded."""
        self._refuse_if_shared("load a model")
        self._check_open()
        await self._to_the_end(self._load(name))

    async def _load(self, name: str) -> None:
        if self._root is None:
            await self._load_static(name)
            return
        model_dir = self._root / name
        if not name or "/" in name or name.startswith(".") or not model_dir.is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository")
        retired: list[_Retired] = []
        try:
            async with self._lock:
                self._check_open()
                # Scanned under the lock: a concurrent load or poll cannot slip in between.
                entry = await asyncio.to_thread(scan_model, model_dir)
                self._unloaded.discard(name)
                self._mark_changed(name)
                await self._apply(name, entry, retired, force=True)
                self._seen[name] = entry.state
        finally:
            await self._finish(retired)
        model = self._models[name]
        if not model.engines:
            raise InvalidInput(f"failed to load model {name!r}{self._reasons(model)}")

    def _mark_changed(self, name: str) -> None:
        self._generation += 1
        self._changed[name] = self._generation

    async def _load_static(self, name: str) -> None:
        """Without a directory, a load brings an unloaded model's engines back: fresh ones,
        built from the same settings (an unloaded engine may still be draining, and its drain
        must close it alone)."""
        if not any(e.name == name for e in self._static):
            raise ModelNotFound(f"unknown model {name!r}")
        async with self._lock:
            self._check_open()
            model = self._models[name]
            for index, engine in enumerate(self._static):
                if engine.name != name or engine.version in model.engines:
                    continue
                model.status[engine.version] = VersionStatus(LOADING)
                fresh = engine.fresh()
                try:
                    await fresh.start()
                except Exception as err:
                    reason = err.message if isinstance(err, BatchserveError) else repr(err)
                    model.status[engine.version] = VersionStatus(UNAVAILABLE, reason)
                    self._failed(f"{name} version {engine.version}", reason)
                    continue
                self._static[index] = fresh
                model.engines[engine.version] = fresh
                model.status[engine.version] = VersionStatus(READY)
            model.reroute()
        if not model.engines:
            raise InvalidInput(f"failed to load model {name!r}{self._reasons(model)}")

    async def unload(self, name: str) -> None:
        """Unload every version of a model (the repository API's unload); returns once its
        in-flight requests are done (or the drain timeout passed). Polling leaves it unloaded
        until it is loaded again."""
        self._refuse_if_shared("unload a model")
        self._check_open()
        await self._to_the_end(self._unload(name))

    async def _unload(self, name: str) -> None:
        retired: list[_Retired] = []
        try:
            async with self._lock:
                model = self._models.get(name)
                if model is None:
                    raise ModelNotFound(f"unknown model {name!r}")
                self._unloaded.add(name)
                self._mark_changed(name)
                unloaded = VersionStatus(UNAVAILABLE, "unloaded")
                for version in list(model.engines):
                    self._retire(model, version, retired, after=unloaded)
        finally:
            await self._finish(retired)

    async def _apply(
        self,
        name: str,
        entry: ModelDirectory | None,
        retired: list[_Retired],
        force: bool = False,
    ) -> None:
        model = self._models.setdefault(name, _Model(name))
        if entry is None:  # the model's directory is gone
            for version in list(model.engines):
                self._retire(model, version, retired)
            del self._models[name]
            log.info("model %s removed", name)
            return
        model.status.pop(_MODEL_LEVEL, None)
        if entry.error is not None:
            # A bad config keeps the versions already serving; a model with none is reported.
            model.status[_MODEL_LEVEL] = VersionStatus(UNAVAILABLE, entry.error)
            self._failed(name, entry.error)
            return
        model.traffic = entry.config.traffic
        wanted = entry.config.version_policy.select(list(entry.versions))
        for version in wanted:
            if not force and await self._unchanged(model, version, entry):
                continue
            path = entry.versions[version]
            if await self._start(model, version, path, entry.config, retired):
                model.fingerprints[version] = _Loaded(
                    entry.fingerprints[version],
                    entry.config_fingerprint,
                    model.engines[version].digest,
                    version not in entry.racy,
                )
        kept = self._keep_in_place_of_failed(model, wanted)
        for version in [v for v in list(model.engines) if v not in wanted and v not in kept]:
            self._retire(model, version, retired)
        for version, status in list(model.status.items()):
            if version in (_MODEL_LEVEL, *wanted) or status.state == UNLOADING:
                continue
            if version not in model.engines:
                del model.status[version]
                model.fingerprints.pop(version, None)
        model.reroute()

    async def _unchanged(self, model: _Model, version: str, entry: ModelDirectory) -> bool:
        """Whether the version's engine still serves what the directory holds. A changed
        stat, or one that cannot be trusted yet (see `ModelDirectory.racy`), is settled by the
        file's content: a touch or a copy of the same bytes reloads nothing."""
        loaded = model.fingerprints.get(version)
        if loaded is None or version not in model.engines:
            return False
        if loaded.config != entry.config_fingerprint:
            return False
        stat = entry.fingerprints[version]
        if stat == loaded.stat and loaded.settled:
            return True
        try:
            digest = await asyncio.to_thread(file_digest, entry.versions[version])
        except OSError:
            return False  # gone or unreadable: the load reports why
        if digest != loaded.digest:
            return False
        model.fingerprints[version] = replace(loaded, stat=stat, settled=version not in entry.racy)
        return True

    async def _drifted(self, name: str, entry: ModelDirectory | None) -> bool:
        """Whether a version loaded from a file too recent to trust its stat (unchanged since)
        now has other bytes."""
        model = self._models.get(name)
        if model is None or entry is None or entry.error is not None:
            return False
        for version, loaded in list(model.fingerprints.items()):
            if loaded.settled or version not in entry.versions:
                continue
            if not await self._unchanged(model, version, entry):
                return True
        return False

    def _keep_in_place_of_failed(self, model: _Model, wanted: list[str]) -> list[str]:
        """The serving versions the policy would drop but that stay, one for each wanted
        version that did not come up: a broken rollout must fail, not take the model down."""
        failed = [v for v in wanted if v not in model.engines]
        outgoing = sorted((v for v in model.engines if v not in wanted), key=version_order)
        kept = outgoing[max(0, len(outgoing) - len(failed)) :] if failed else []
        for version in wanted:  # back in the policy: no longer a stand-in
            status = model.status.get(version)
            if version in model.engines and status and status.reason.startswith(_KEPT):
                model.status[version] = VersionStatus(READY)
        if kept:
            reason = f"{_KEPT}version {', '.join(failed)} did not load"
            for version in kept:
                model.status[version] = VersionStatus(READY, reason)
            log.error(
                "model %s: version %s did not load; version %s keeps serving",
                model.name,
                ", ".join(failed),
                ", ".join(kept),
            )
        return kept

    async def _start(
        self,
        model: _Model,
        version: str,
        path: Path,
        config: ModelConfig,
        retired: list[_Retired],
    ) -> bool:
        assert self._factory is not None
        old = model.engines.get(version)
        if old is None:
            model.status[version] = VersionStatus(LOADING)
        try:
            engine = self._factory(model.name, version, path, config)
            await engine.start()
        except Exception as err:  # whatever a model (or its handler) raises fails this version
            if isinstance(err, BatchserveError):
                reason = err.message
            else:
                reason = f"{type(err).__name__}: {err}"
                if not isinstance(err, OSError | ValueError):  # a bug: keep its traceback
                    log.error("loading %s version %s failed", model.name, version, exc_info=err)
            if old is not None:  # the previous file's engine still answers for this version
                reason = f"reload failed, still serving the previous file: {reason}"
                model.status[version] = VersionStatus(READY, reason)
            else:
                model.status[version] = VersionStatus(UNAVAILABLE, reason)
            self._failed(f"{model.name} version {version}", reason)
            return False
        model.engines[version] = engine
        model.status[version] = VersionStatus(READY)
        model.reroute()
        log.info("model %s version %s is serving", model.name, version)
        if old is not None:  # the same version from a new file: the old engine drains
            self._retiring.add(old)
            retired.append(_Retired(model, version, old, None))
        return True

    def _failed(self, what: str, reason: str) -> None:
        name = what.split(" ", 1)[0]
        self.load_failures[name] = self.load_failures.get(name, 0) + 1
        log.error("cannot serve %s: %s", what, reason)

    def _retire(
        self,
        model: _Model,
        version: str,
        retired: list[_Retired],
        after: VersionStatus | None = None,
    ) -> None:
        """Unpublish a version now (no new request reaches it); `_finish` drains and closes
        it once the lock is released."""
        engine = model.engines.pop(version, None)
        model.fingerprints.pop(version, None)
        if engine is None:
            return
        marker = model.status[version] = VersionStatus(UNLOADING)
        model.reroute()
        engine.retire()
        self._retiring.add(engine)
        retired.append(_Retired(model, version, engine, marker, after))

    async def _finish(self, retired: list[_Retired]) -> None:
        """Drain and close what was unpublished, all at once, outside the lock."""
        if not retired:
            return
        await asyncio.gather(*(self._drain_and_close(r.engine) for r in retired))
        for item in retired:
            if item.marker is None:
                continue
            model = item.model
            # Unless a newer load has taken the version over meanwhile.
            if model.status.get(item.version) is item.marker:
                if item.after is None:
                    del model.status[item.version]
                else:
                    model.status[item.version] = item.after
            log.info("model %s version %s unloaded", model.name, item.version)

    async def _drain_and_close(self, engine: Engine) -> None:
        """In-flight requests finish (up to the drain timeout), then the engine closes; a
        close that overruns the same timeout goes on in the background."""
        engine.retire()
        await engine.quiesce(self._drain_timeout_s)
        task = asyncio.ensure_future(engine.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closed)
        self._retiring.discard(engine)  # from here on `_closing` tracks it
        done, _ = await asyncio.wait({task}, timeout=self._drain_timeout_s)
        if not done:
            log.warning(
                "model %s version %s did not close within %g s; left to finish",
                engine.name,
                engine.version,
                self._drain_timeout_s,
            )

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("closing an engine failed", exc_info=task.exception())
