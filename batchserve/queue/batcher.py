"""The async batcher: queues requests, asks the policy when to dispatch, splits results back."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from statistics import median_high, median_low
from typing import TYPE_CHECKING, Protocol

import numpy as np

from batchserve.clock import Clock
from batchserve.errors import InferenceFailed, NotReady, Overloaded
from batchserve.histogram import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, HistogramSnapshot
from batchserve.lifecycle import Lifecycle
from batchserve.queue.policy import ArrivalRate, BatchPolicy, QueueState
from batchserve.queue.priority import PriorityConfig, choose_tier, expired

if TYPE_CHECKING:
    from batchserve.tracing import BatchTracer, RequestTrace

Signature = tuple[tuple[int, ...], ...]
DEADLINE_HEADROOM = 0.8
# Runs the service-rate estimate remembers: its median ignores any minority of odd runs.
RATE_WINDOW = 15
# How far back the queue's recent waits count: dispatches older than this say nothing about
# the queue now (an idle queue must not keep refusing on the waits of a past burst).
SOJOURN_INTERVAL_S = 0.1
# One run's outputs in the model's output order (a request's rows of them, once split).
RunOutputs = list[np.ndarray]


class Runner(Protocol):
    """What the batcher needs from a session pool."""

    @property
    def idle(self) -> int: ...

    @property
    def size(self) -> int: ...

    def try_run(
        self, arrays: list[np.ndarray], done: Callable[[RunOutputs | BaseException], None]
    ) -> bool: ...

    # While `done` runs: that run's own seconds, as its thread saw them (None: not known, the
    # time until `done` is used). Under load the event loop takes a run's answer late; that
    # delay is the loop's lag, which admission adds itself, and it stays in a median of run
    # times long after the loop has caught up: priced twice, it refuses everything.
    last_run_s: float | None


class Pending:
    """One request in the queue; the caller's future travels with it."""

    __slots__ = ("arrays", "batch_rows", "enqueued_at", "future", "rows", "seq", "signature",
                 "tier", "trace")  # fmt: skip

    def __init__(
        self,
        arrays: list[np.ndarray],
        rows: int,
        signature: Signature,
        future: asyncio.Future[RunOutputs],
        now: float,
        seq: int = 0,
        tier: int = 0,
    ) -> None:
        self.arrays = arrays
        self.rows = rows
        self.signature = signature
        self.future = future
        self.enqueued_at = now
        self.seq = seq  # arrival order: ties in the clock must not reorder requests
        self.batch_rows = 0  # rows of the run it went into, once dispatched
        self.tier = tier  # its priority level's queue (0: the highest, or the only one)
        self.trace: RequestTrace | None = None  # its span, when traced (set by the engine)


class _Tier:
    """The queue of one priority level (a model without priorities has one): its requests in
    shape groups, each group under the arrival order of its head (a heap, so that the oldest
    group is found in O(log n) rather than by a scan: an entry goes stale when its group's
    head changes, a new one is pushed then, and stale ones are dropped when met)."""

    __slots__ = ("delayed", "groups", "heads", "queued_rows", "rejected", "sojourns", "wait")

    def __init__(self) -> None:
        self.groups: dict[Signature, deque[Pending]] = {}
        self.heads: list[tuple[int, Signature]] = []
        self.queued_rows = 0
        self.rejected = 0
        self.delayed = 0  # requests moved from this level to the delayed queue
        # (dispatch time, mean wait of its requests) of this queue's recent runs.
        self.sojourns: deque[tuple[float, float]] = deque(maxlen=RATE_WINDOW)
        self.wait = Histogram(LATENCY_BUCKETS)


@dataclass(frozen=True, slots=True)
class LevelStatistics:
    """One priority level's queue (the last one, `delayed`, holds late requests of levels
    whose policy delays them)."""

    level: str
    queued_rows: int
    rejected: int
    delayed: int
    queue_wait: HistogramSnapshot


@dataclass(slots=True)
class BatcherStatistics:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    batch_rows: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    queued_rows: int = 0
    in_flight_batches: int = 0
    shape_groups: int = 0  # distinct input shapes waiting
    groups_scanned: int = 0  # group heads looked at to find the oldest (the dispatch's cost)
    retry_runs: int = 0  # extra runs that isolated the request(s) that failed a merged run
    queue_wait_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    # Requests a finished run answered, the time they waited for that run's dispatch, and the
    # run's time counted once for each of them: Triton's per-request statistics, kept per run.
    answered: int = 0
    answered_wait_s: float = 0.0
    answered_run_s: float = 0.0
    # Finished runs (failed ones and reruns included) by rows: (runs, seconds).
    run_stats: dict[int, tuple[int, float]] = field(default_factory=dict)
    since_last_run_s: float | None = None  # since the last run finished; None before any
    queue_wait: HistogramSnapshot | None = None
    run_time: HistogramSnapshot | None = None
    batch_rows_histogram: HistogramSnapshot | None = None
    levels: tuple[LevelStatistics, ...] = ()  # by priority level, when the model has levels


class Batcher(Lifecycle):
    """Merges requests with the same non-batch shapes into runs of at most `max_rows` rows.

    Requests are served FIFO across shape groups; with `priority`, from the highest level that
    has requests waiting, FIFO within it, one run in every `priority.share` going to the oldest
    request whatever its level (see queue/priority.py). A request with more rows than
    `max_rows` runs alone as one batch (it is not split). For models without a batch dimension
    every request is its own run. When a merged run fails, its requests are rerun in halves
    until the failure is pinned on the requests that fail alone: only those get the error.
    """

    def __init__(
        self,
        runner: Runner,
        policy: BatchPolicy,
        clock: Clock,
        *,
        max_queue_rows: int,
        batched: bool = True,
        max_shape_groups: int = 1024,
        priority: PriorityConfig | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        if max_shape_groups < 1:
            raise ValueError("max_shape_groups must be >= 1")
        self._runner = runner
        self._policy = policy
        self._clock = clock
        self._max_queue_rows = max_queue_rows
        self._max_rows = policy.max_rows if batched else 1
        self._batched = batched
        self._max_shape_groups = max_shape_groups
        self._priority = priority
        self._delays = priority is not None and priority.delays  # a `delayed` queue to feed
        self._tracer = tracer  # None: tracing off, and no run costs anything for it
        self._tiers = [_Tier() for _ in range(priority.tiers if priority else 1)]
        self._turns = 0  # runs dispatched: every `priority.share`-th goes to the oldest request
        self._seq = itertools.count()
        # Halves of failed merged runs, rerun before anything else: they have waited already.
        self._retries: deque[list[Pending]] = deque()
        self._arrivals = ArrivalRate()
        self._stats = BatcherStatistics()
        self._queue_wait = Histogram(LATENCY_BUCKETS)
        self._run_time = Histogram(LATENCY_BUCKETS)
        self._batch_rows = Histogram(BATCH_BUCKETS)
        self._last_run_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._closing = False
        self._idle: asyncio.Event | None = None
        # Per-session service: rows per second of run time, and seconds per run. They price
        # the queue's wait, so that a request that cannot make its deadline is refused on
        # arrival instead of waiting only to time out (which wastes the slot). Medians of the
        # last runs: one odd run (millions of zero-size rows done in microseconds) would drag
        # a mean for a hundred batches, and with it switch deadline shedding off.
        self._rates: deque[float] = deque(maxlen=RATE_WINDOW)
        self._run_times: deque[float] = deque(maxlen=RATE_WINDOW)
        self._row_rate = 0.0
        self._run_s = 0.0
        # Each queue's recent runs' waits (`_Tier.sojourns`): where the queue drains at the
        # event loop's pace rather than the sessions' (a cheap model on a busy loop), rows
        # ahead ÷ row rate sees only the compute, while what requests really waited shows the
        # wait a new arrival will meet. Kept per priority level: a high level waits less.

    async def start(self) -> None:
        """Bind to the running loop; requests are accepted from now on."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the caller's side -------------------------------------------------------------------

    def submit(
        self,
        arrays: list[np.ndarray],
        rows: int,
        signature: Signature,
        deadline_s: float | None = None,
        tier: int = 0,
    ) -> Pending:
        """Queue a request; await `.future` for its own output rows. With `deadline_s`, a
        request the queue's expected wait would make late is refused at once (Overloaded).
        `tier`: its priority level's queue (`PriorityConfig.tier`; 0 without priorities)."""
        loop = self._loop
        if loop is None or self._closing:
            raise NotReady("the model is not accepting requests")
        stats = self._stats
        queue = self._tiers[tier]
        if stats.queued_rows + rows > self._max_queue_rows and stats.queued_rows:
            self._reject(queue)
            raise Overloaded(
                f"queue full ({stats.queued_rows} rows waiting, limit {self._max_queue_rows})"
            )
        if self._priority is not None:
            self._check_level_room(queue, tier, rows)
        if deadline_s is not None and stats.queued_rows:
            self._check_deadline(rows, deadline_s, 0.0, tier)
        group = queue.groups.get(signature)
        if group is None and self._shape_groups() >= self._max_shape_groups:
            # Each group is its own queue the dispatcher must track: bound how many a client
            # sending ever-new shapes can open.
            self._reject(queue)
            raise Overloaded(
                f"too many distinct input shapes waiting ({self._shape_groups()}, "
                f"limit {self._max_shape_groups})"
            )
        now = self._clock.now()
        item = Pending(arrays, rows, signature, loop.create_future(), now, next(self._seq), tier)
        if group is None:
            group = queue.groups[signature] = deque()
        group.append(item)
        if len(group) == 1:
            self._push_head(queue, signature, group)
        stats.requests += 1
        stats.queued_rows += rows
        queue.queued_rows += rows
        self._arrivals.observe(now)
        assert self._idle is not None
        self._idle.clear()
        self._schedule()
        return item

    def count_refusal(self) -> None:
        """A request refused before it reached `check_room` (see `Engine.count_refusal`)."""
        self._stats.rejected += 1

    def check_room(self, deadline_s: float | None = None, waited_s: float = 0.0) -> None:
        """Refuse now, before the request is even read, when the queue is already full or its
        expected wait, after the `waited_s` the request already spent reaching us, already
        exceeds `deadline_s`. Its priority is in its body, not read yet: with priorities, the
        wait is the highest level's, and `submit` checks the request's own level."""
        stats = self._stats
        if stats.queued_rows >= self._max_queue_rows:
            stats.rejected += 1  # no level: the request's priority is in its body, unread
            raise Overloaded(
                f"queue full ({stats.queued_rows} rows waiting, limit {self._max_queue_rows})"
            )
        if deadline_s is not None and (stats.queued_rows or waited_s):
            self._check_deadline(1, deadline_s, waited_s, level=False)

    def expected_wait_s(self, rows: int, tier: int = 0) -> float:
        """Estimated time until `rows` more rows of priority queue `tier` would be computed:
        the rows queued ahead (at its level and above) served at the measured rate by every
        session, plus one run; or, when longer, what its queue's requests dispatched in the
        last `SOJOURN_INTERVAL_S` waited (their median), plus one run. 0 before any run."""
        if not self._row_rate:
            return 0.0
        sessions = max(1, self._runner.size)
        priority = self._priority
        if priority is not None and priority.share > 1:
            served = self._rows_until(tier, rows, priority.share)
        else:  # one queue, or levels served in arrival order (share 1)
            served = self._stats.queued_rows + rows
        ahead = served / (self._row_rate * sessions)
        return max(ahead, self.recent_wait_s(tier)) + self._run_s

    def _rows_until(self, tier: int, rows: int, share: int) -> int:
        """Rows of run time until `rows` new rows of queue `tier` are served. The levels above
        go first; while they have work, this level gets only the share turns (one run in
        `share`), so its rows drain `share` times slower than runs go."""
        tiers = self._tiers
        above = sum([t.queued_rows for t in tiers[:tier]])
        own = tiers[tier].queued_rows + rows
        if above < self._max_rows:
            # The next run has room after the levels above, and room goes to this level
            # (`_take`): it drains as fast as the runs go.
            return above + own
        return max(above + own, own * share)

    def recent_wait_s(self, tier: int = 0) -> float:
        """The median queue wait of priority queue `tier`'s runs dispatched in the last
        `SOJOURN_INTERVAL_S` (0 when none were): a standing queue shows here however fast the
        sessions are."""
        sojourns = self._tiers[tier].sojourns
        if not sojourns:
            return 0.0
        since = self._clock.now() - SOJOURN_INTERVAL_S
        while sojourns and sojourns[0][0] < since:
            sojourns.popleft()
        return median_low([wait for _, wait in sojourns]) if sojourns else 0.0

    def _check_deadline(
        self, rows: int, deadline_s: float, waited_s: float = 0.0, tier: int = 0, level: bool = True
    ) -> None:
        wait = self.expected_wait_s(rows, tier) + waited_s
        # A fifth of the deadline stays for what the estimate does not see: HTTP, scheduling
        # jitter, a run slower than the average.
        if wait > DEADLINE_HEADROOM * deadline_s:
            if level:
                self._reject(self._tiers[tier])
            else:  # before the body: the request's level is not known
                self._stats.rejected += 1
            raise Overloaded(
                f"the queue's expected wait ({wait * 1000:.0f} ms) exceeds the request's "
                f"deadline ({deadline_s * 1000:g} ms)"
            )

    def _check_level_room(self, queue: _Tier, tier: int, rows: int) -> None:
        assert self._priority is not None
        limit = self._priority.policy(tier).max_queue_rows
        if limit is not None and queue.queued_rows + rows > limit and queue.queued_rows:
            self._reject(queue)
            raise Overloaded(
                f"priority level {tier + 1}'s queue full ({queue.queued_rows} rows waiting, "
                f"limit {limit})"
            )

    def _reject(self, queue: _Tier) -> None:
        self._stats.rejected += 1
        queue.rejected += 1

    def _shape_groups(self) -> int:
        tiers = self._tiers
        return len(tiers[0].groups) if len(tiers) == 1 else sum([len(t.groups) for t in tiers])

    def withdraw(self, item: Pending) -> None:
        """The caller gave up (client gone): drop the item unless its batch already runs."""
        if item.future.done() and not item.future.cancelled():
            return
        if not item.future.done():
            item.future.cancel()
        if self._remove(item):
            self._stats.cancelled += 1

    def _remove(self, item: Pending) -> bool:
        queue = self._tiers[item.tier]
        group = queue.groups.get(item.signature)
        if group is None:
            return False
        was_head = group[0] is item
        try:
            group.remove(item)
        except ValueError:
            return False  # already taken into a running batch
        self._stats.queued_rows -= item.rows
        queue.queued_rows -= item.rows
        if not group:
            del queue.groups[item.signature]
        elif was_head:
            self._push_head(queue, item.signature, group)
        self._check_idle()
        return True

    def wake(self) -> None:
        """The runner has capacity again (a session rejoined): dispatch what is waiting."""
        if self._stats.queued_rows or self._retries:
            self._schedule()

    # -- dispatch ------------------------------------------------------------------------------

    def _schedule(self) -> None:
        # Deferred to the next loop iteration so every request that arrived in this one joins.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        runner = self._runner
        if self._retries and not self._dispatch_retries():
            return
        while self._stats.queued_rows > 0:
            # Every session busy: nothing can start, so an arrival costs O(1) however many
            # shape groups wait. With no session left at all, dispatch anyway: the runner
            # fails the batch at once instead of leaving it to wait forever.
            if not runner.idle and runner.size:
                return
            now = self._clock.now()
            queue, signature = self._next(now)
            if runner.size:
                decision = self._policy.decide(self._state(queue, signature), now)
                if not decision.dispatch:
                    if decision.wake_at is not None:
                        self._arm(decision.wake_at, now)
                    return
            batch, rows = self._take(queue, signature)
            done = (
                partial(self._done, batch, rows, now)
                if self._tracer is None
                else self._traced(batch, rows, now)
            )
            if not runner.try_run(self._assemble(batch), done):
                self._requeue(batch)
                return
            self._record(batch, rows, now)

    def _dispatch_retries(self) -> bool:
        """Start the halves of failed batches; False when a session was not free for one."""
        retries, stats = self._retries, self._stats
        while retries:
            batch = [item for item in retries[0] if not item.future.done()]
            if batch:
                rows = sum(item.rows for item in batch)
                started = self._clock.now()
                done = (
                    partial(self._done, batch, rows, started)
                    if self._tracer is None
                    else self._traced(batch, rows, started)
                )
                if not self._runner.try_run(self._assemble(batch), done):
                    return False
                stats.retry_runs += 1
                stats.in_flight_batches += 1
                for item in batch:
                    item.batch_rows = rows
            stats.cancelled += len(retries.popleft()) - len(batch)  # withdrawn meanwhile
        self._check_idle()
        return True

    def _next(self, now: float) -> tuple[_Tier, Signature]:
        """The queue the next run comes from and its oldest shape group (something waits)."""
        tiers = self._tiers
        priority = self._priority
        if priority is None:
            return tiers[0], self._oldest(tiers[0])
        if self._delays:
            self._delay_late(priority, now)
        oldest = [self._oldest_seq(t) for t in tiers]
        queue = tiers[choose_tier(oldest, self._turns, priority.share)]
        return queue, self._oldest(queue)

    def _oldest_seq(self, queue: _Tier) -> int | None:
        if not queue.groups:
            return None
        return queue.groups[self._oldest(queue)][0].seq

    def _delay_late(self, priority: PriorityConfig, now: float) -> None:
        """Move the requests of `delay` levels that outlived their level's timeout to the
        delayed queue (the last), oldest first: only each level's oldest can be the next."""
        tiers = self._tiers
        delayed = tiers[-1]
        for tier, queue in enumerate(tiers[:-1]):
            policy = priority.policy(tier)
            if policy.on_timeout != "delay":
                continue
            while queue.groups:
                signature = self._oldest(queue)
                group = queue.groups[signature]
                item = group[0]
                if not expired(item.enqueued_at, policy, now):
                    break
                group.popleft()
                heapq.heappop(queue.heads)  # its entry: `_oldest` just found it on top
                if group:
                    self._push_head(queue, signature, group)
                else:
                    del queue.groups[signature]
                queue.queued_rows -= item.rows
                queue.delayed += 1
                item.tier = len(tiers) - 1
                late = delayed.groups.get(signature)
                if late is None:
                    late = delayed.groups[signature] = deque()
                late.append(item)
                if len(late) == 1:
                    self._push_head(delayed, signature, late)
                delayed.queued_rows += item.rows

    def _oldest(self, queue: _Tier) -> Signature:
        """The group of `queue` whose head request arrived first (it must not be empty)."""
        heads, groups, stats = queue.heads, queue.groups, self._stats
        while True:
            seq, signature = heads[0]
            stats.groups_scanned += 1
            group = groups.get(signature)
            if group is not None and group[0].seq == seq:
                return signature
            heapq.heappop(heads)

    def _push_head(self, queue: _Tier, signature: Signature, group: deque[Pending]) -> None:
        heads, groups = queue.heads, queue.groups
        heapq.heappush(heads, (group[0].seq, signature))
        if len(heads) > 2 * len(groups) + 64:
            # Mostly stale entries of groups that left: rebuild, amortized O(1) per push.
            self._stats.groups_scanned += len(groups)
            heads[:] = [(g[0].seq, s) for s, g in groups.items()]
            heapq.heapify(heads)

    def _state(self, queue: _Tier, signature: Signature) -> QueueState:
        idle = self._runner.idle
        return QueueState(
            queued_rows=self._stats.queued_rows,
            oldest_enqueued_at=queue.groups[signature][0].enqueued_at,
            idle_sessions=idle,
            busy_sessions=self._runner.size - idle,
            arrival_gap_s=self._arrivals.gap_s,
            flush=self._closing,
        )

    def _take(self, queue: _Tier, signature: Signature) -> tuple[list[Pending], int]:
        """The group's head requests, in order, up to max rows (at least one request). With
        priorities, room left in the run goes to the requests of the same shape in the other
        levels, highest first: levels order the requests, not the runs, so runs are as full
        as without them (Triton's priority queue batches the same way)."""
        heapq.heappop(queue.heads)  # the group's own entry: `_oldest` just found it on top
        group = queue.groups[signature]
        first = group.popleft()
        batch = [first]
        self._stats.queued_rows -= first.rows
        queue.queued_rows -= first.rows
        rows = self._fill(queue, signature, group, batch, first.rows, moved=True)
        if self._priority is not None and self._batched:
            for other in self._tiers:
                if rows >= self._max_rows:
                    break
                more = None if other is queue else other.groups.get(signature)
                if more:
                    rows = self._fill(other, signature, more, batch, rows, moved=False)
        return batch, rows

    def _fill(
        self,
        queue: _Tier,
        signature: Signature,
        group: deque[Pending],
        batch: list[Pending],
        rows: int,
        *,
        moved: bool,
    ) -> int:
        """Move `group`'s head requests into `batch` while they fit in max rows, and keep the
        group's heap entry and the row counts right; `moved`: its head left already. Returns
        the batch's rows."""
        while group and rows + group[0].rows <= self._max_rows and self._batched:
            item = group.popleft()
            batch.append(item)
            rows += item.rows
            self._stats.queued_rows -= item.rows
            queue.queued_rows -= item.rows
            moved = True
        if not group:
            del queue.groups[signature]  # its heap entries go stale and are dropped when met
        elif moved:
            self._push_head(queue, signature, group)
        return rows

    def _requeue(self, batch: list[Pending]) -> None:
        # Each request back at the head of its own level's group, in the order it left.
        signature = batch[0].signature
        for item in reversed(batch):
            queue = self._tiers[item.tier]
            queue.groups.setdefault(signature, deque()).appendleft(item)
            queue.queued_rows += item.rows
            self._stats.queued_rows += item.rows
        for tier in sorted({item.tier for item in batch}):
            queue = self._tiers[tier]
            self._push_head(queue, signature, queue.groups[signature])

    @staticmethod
    def _assemble(batch: list[Pending]) -> list[np.ndarray]:
        if len(batch) == 1:
            return batch[0].arrays
        columns = zip(*(item.arrays for item in batch), strict=True)
        return [np.concatenate(column) for column in columns]

    def _record(self, batch: list[Pending], rows: int, now: float) -> None:
        stats = self._stats
        stats.batches += 1
        stats.batch_rows += rows
        stats.in_flight_batches += 1
        stats.rows += rows
        stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1
        self._batch_rows.observe(rows)
        observe = self._queue_wait.observe
        total = 0.0
        for item in batch:
            item.batch_rows = rows
            wait = now - item.enqueued_at
            total += wait
            observe(wait)
        stats.queue_wait_s += total
        tiers = self._tiers
        if self._priority is None:
            tiers[0].sojourns.append((now, total / len(batch)))
            return
        self._turns += 1
        # Each level's recent waits from its own requests: a run mixes levels (`_take`), and
        # the low ones' long waits must not price the high level's.
        waits: dict[int, list[float]] = {}
        for item in batch:
            wait = now - item.enqueued_at
            tiers[item.tier].wait.observe(wait)
            waits.setdefault(item.tier, []).append(wait)
        for tier, level_waits in waits.items():
            tiers[tier].sojourns.append((now, sum(level_waits) / len(level_waits)))

    def _done(
        self, batch: list[Pending], rows: int, started: float, result: RunOutputs | BaseException
    ) -> None:
        self._stats.in_flight_batches -= 1
        now = self._clock.now()
        elapsed = now - started
        self._run_time.observe(elapsed)
        self._count_run(rows, elapsed, now)
        if isinstance(result, BaseException):
            self._failed(batch, result)
        else:
            ran = self._runner.last_run_s
            service = ran if ran is not None and 0 < ran < elapsed else elapsed
            if service > 0:
                self._measure(rows, service)
            if len(batch) == 1:
                _resolve(batch[0].future, result)
                self._count_answered(batch, started, elapsed)
            elif self._split(batch, rows, result):
                self._count_answered(batch, started, elapsed)
        self._check_idle()
        if self._stats.queued_rows or self._retries:
            self._schedule()

    def _traced(
        self, batch: list[Pending], rows: int, started: float
    ) -> Callable[[RunOutputs | BaseException], None]:
        """`_done` for a run that a span records, with the session it is about to start on."""
        session = getattr(self._runner, "next_session", None)  # a SessionPool's; fakes: None
        return partial(self._done_traced, batch, rows, started, session)

    def _done_traced(
        self,
        batch: list[Pending],
        rows: int,
        started: float,
        session: int | None,
        result: RunOutputs | BaseException,
    ) -> None:
        assert self._tracer is not None
        error = result if isinstance(result, BaseException) else None
        # Before `_done` resolves the futures: the request spans are still open to link to it.
        # A tracing fault must never keep the requests from their answers.
        try:
            self._tracer.ran(batch, rows, session, started, self._clock.now(), error)
        finally:
            self._done(batch, rows, started, result)

    def _count_run(self, rows: int, elapsed: float, now: float) -> None:
        runs, seconds = self._stats.run_stats.get(rows, (0, 0.0))
        self._stats.run_stats[rows] = (runs + 1, seconds + elapsed)
        self._last_run_at = now

    def _count_answered(self, batch: list[Pending], started: float, elapsed: float) -> None:
        stats, count = self._stats, len(batch)
        stats.answered += count
        stats.answered_run_s += elapsed * count
        stats.answered_wait_s += sum([started - item.enqueued_at for item in batch])

    def _measure(self, rows: int, elapsed: float) -> None:
        self._rates.append(rows / elapsed)
        self._run_times.append(elapsed)
        # With an even count, the cautious middle value: a rate too high, or a run too short,
        # is what would let requests in that then miss their deadline.
        self._row_rate = median_low(self._rates)
        self._run_s = median_high(self._run_times)

    def _failed(self, batch: list[Pending], error: BaseException) -> None:
        # One request's bad input (an index out of range) fails the whole merged run: rerun it
        # in halves, so that only the requests that fail alone get the error. k bad requests
        # among n cost at most 2k·log2(n) extra runs. With no session left, rerunning is moot.
        if len(batch) > 1 and self._runner.size:
            middle = len(batch) // 2
            self._retries.append(batch[:middle])
            self._retries.append(batch[middle:])
            return
        self._fail(batch, InferenceFailed(f"inference failed: {_describe(error)}"))

    def _split(self, batch: list[Pending], rows: int, outputs: RunOutputs) -> bool:
        """Each request's rows of the outputs; False (the batch failed) when they do not
        follow the batch dimension."""
        bad = [o.shape for o in outputs if not o.shape or o.shape[0] != rows]
        if bad:
            self._fail(batch, InferenceFailed(f"model returned shapes {bad} for {rows} rows"))
            return False
        offset = 0
        for item in batch:
            end = offset + item.rows
            _resolve(item.future, [o[offset:end] for o in outputs])
            offset = end
        return True

    def _fail(self, batch: list[Pending], error: BaseException) -> None:
        self._stats.failed += len(batch)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    def _arm(self, wake_at: float, now: float) -> None:
        if self._timer is not None and self._timer_at <= wake_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = wake_at
        self._timer = self._loop.call_later(max(0.0, wake_at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._pump()

    def _check_idle(self) -> None:
        stats = self._stats
        if stats.queued_rows == 0 and stats.in_flight_batches == 0 and not self._retries:
            assert self._idle is not None
            self._idle.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop accepting, run everything already queued, wait for it to finish."""
        if self._loop is None:
            return
        self._closing = True
        self._schedule()
        assert self._idle is not None
        await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def closing(self) -> bool:
        return self._closing

    def statistics(self) -> BatcherStatistics:
        return replace(
            self._stats,
            shape_groups=self._shape_groups(),
            levels=self._level_statistics(),
            batch_sizes=dict(self._stats.batch_sizes),
            run_stats=dict(self._stats.run_stats),
            since_last_run_s=(
                None if self._last_run_at is None else self._clock.now() - self._last_run_at
            ),
            queue_wait=self._queue_wait.snapshot(),
            run_time=self._run_time.snapshot(),
            batch_rows_histogram=self._batch_rows.snapshot(),
        )

    def _level_statistics(self) -> tuple[LevelStatistics, ...]:
        priority = self._priority
        if priority is None:
            return ()
        return tuple(
            LevelStatistics(str(i + 1) if i < priority.levels else "delayed", t.queued_rows,
                            t.rejected, t.delayed, t.wait.snapshot())
            for i, t in enumerate(self._tiers)
        )  # fmt: skip


def _resolve(future: asyncio.Future[RunOutputs], outputs: RunOutputs) -> None:
    if not future.done():
        future.set_result(outputs)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
