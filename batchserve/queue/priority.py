"""Request priorities: the levels a model's queue has, each level's queue policy, and which
level the next run is taken from. Pure: no I/O and no clock of its own (times come in).

A request names its priority as Triton's do (V2 `parameters.priority`, over HTTP and gRPC):
1 is the highest level, `levels` the lowest, 0 or none the model's default level. Runs are
taken from the highest level that has requests waiting, oldest first within it (FIFO, as
without priorities), except that one run in every `share` is taken from wherever the oldest
waiting request is, whatever its level. That is the bound on starvation: while requests wait,
the oldest of them is dispatched within `share` runs, so a request with n requests ahead of it
in arrival order (of any level) waits at most `share * (n + 1)` runs.

Each level may have its own queue policy, as Triton's `priority_queue_policy`:
`max_queue_rows` (429 past it), a default timeout for its requests, and what happens when a
request outlives it: `reject` (the timeout is the request's deadline: refused on arrival when
the queue cannot meet it, 504 when it is late) or `delay` (never refused for time: once its
timeout passes while it waits, it is served after every request still within its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from batchserve.errors import InvalidInput

TimeoutAction = Literal["reject", "delay"]
TIMEOUT_ACTIONS: tuple[TimeoutAction, ...] = ("reject", "delay")
MAX_LEVELS = 16  # each level is its own queue the dispatcher looks at: keep them few
DEFAULT_SHARE = 8


@dataclass(frozen=True, slots=True)
class LevelPolicy:
    """One level's queue policy. `max_queue_rows`: rows of this level allowed to wait (None:
    only the model's own limit). `timeout_ms`: the default deadline of this level's requests
    (None: the server's); a request's own `parameters.timeout` may only shorten it.
    `on_timeout`: `reject` or `delay` (see the module's description)."""

    max_queue_rows: int | None = None
    timeout_ms: float | None = None
    on_timeout: TimeoutAction = "reject"

    def __post_init__(self) -> None:
        if self.max_queue_rows is not None and self.max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be >= 1, got {self.max_queue_rows}")
        if self.timeout_ms is not None and not self.timeout_ms > 0:
            raise ValueError(f"timeout_ms must be > 0, got {self.timeout_ms}")
        if self.on_timeout not in TIMEOUT_ACTIONS:
            raise ValueError(
                f"on_timeout must be one of {TIMEOUT_ACTIONS}, got {self.on_timeout!r}"
            )
        if self.on_timeout == "delay" and self.timeout_ms is None:
            raise ValueError("on_timeout = 'delay' needs a timeout_ms to delay after")

    @property
    def timeout_s(self) -> float | None:
        return None if self.timeout_ms is None else self.timeout_ms / 1000.0


@dataclass(frozen=True, slots=True)
class PriorityConfig:
    """A model's priority levels (a `[priority]` table in its config.toml).

    `levels`: how many (2 to 16); `default`: the level of a request that names none (the
    lowest when unset); `share`: one run in every `share` goes to the oldest waiting request
    whatever its level (the starvation bound; 1 = plain FIFO); `policies`: per level, the
    first for level 1 (missing ones: no limits of their own)."""

    levels: int = 2
    default: int | None = None
    share: int = DEFAULT_SHARE
    policies: tuple[LevelPolicy, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.levels <= MAX_LEVELS:
            raise ValueError(f"levels must be 2 to {MAX_LEVELS}, got {self.levels}")
        if self.default is not None and not 1 <= self.default <= self.levels:
            raise ValueError(f"default must be a level from 1 to {self.levels}, got {self.default}")
        if self.share < 1:
            raise ValueError(f"share must be >= 1, got {self.share}")
        if len(self.policies) > self.levels:
            raise ValueError(
                f"policies for {len(self.policies)} levels, but levels = {self.levels}"
            )

    @property
    def default_level(self) -> int:
        return self.levels if self.default is None else self.default

    @property
    def delays(self) -> bool:
        """Whether some level delays its late requests (then they have a queue of their own)."""
        return any(p.on_timeout == "delay" for p in self.policies)

    @property
    def tiers(self) -> int:
        """Queues the batcher keeps: one per level, and one for delayed requests if any."""
        return self.levels + 1 if self.delays else self.levels

    def policy(self, tier: int) -> LevelPolicy:
        """The policy of queue `tier` (0 = level 1); the delayed queue has none of its own."""
        policies = self.policies
        return policies[tier] if tier < len(policies) else _NO_POLICY

    def tier(self, priority: int) -> int:
        """The queue (0-based) of a request of `priority` (0: the default level);
        InvalidInput (400) for a priority the model does not have."""
        if priority == 0:
            return self.default_level - 1
        if not 1 <= priority <= self.levels:
            raise InvalidInput(
                f"parameters.priority must be 0 (the model's default) or a level from 1 "
                f"(highest) to {self.levels}, got {priority}"
            )
        return priority - 1

    def deadline_s(self, tier: int, requested_s: float | None) -> float | None:
        """A request's deadline: its own (`requested_s`, already the shorter of its
        `parameters.timeout` and the server's default), shortened by its level's timeout where
        that level rejects late requests. A `delay` level's timeout is not a deadline."""
        policy = self.policy(tier)
        level_s = policy.timeout_s
        if level_s is None or policy.on_timeout != "reject":
            return requested_s
        return level_s if requested_s is None else min(level_s, requested_s)


_NO_POLICY = LevelPolicy()


def choose_tier(oldest: Sequence[int | None], runs: int, share: int) -> int:
    """The queue the next run is taken from. `oldest[t]`: the arrival number of queue t's
    oldest waiting request (None: nothing waits there), queues in priority order; `runs`: runs
    dispatched so far. The highest queue with requests, except on every `share`-th run, which
    goes to the queue holding the oldest request of all. At least one queue must hold one."""
    if share > 1 and runs % share != share - 1:
        for tier, seq in enumerate(oldest):
            if seq is not None:
                return tier
    best = -1
    best_seq = 0
    for tier, seq in enumerate(oldest):
        if seq is not None and (best < 0 or seq < best_seq):
            best, best_seq = tier, seq
    if best < 0:
        raise ValueError("no queue holds a request")
    return best


def expired(enqueued_at: float, policy: LevelPolicy, now: float) -> bool:
    """Whether a request of a `delay` level has outlived its level's timeout while waiting."""
    timeout_s = policy.timeout_s
    return policy.on_timeout == "delay" and timeout_s is not None and now - enqueued_at > timeout_s
