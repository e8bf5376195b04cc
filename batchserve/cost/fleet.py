"""The fleet the simulation's control loops change: pods (starting or ready) on nodes
(provisioning or ready), with a timeline of every change."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import simpy


class Fleet:
    """Pods (starting or ready) on nodes (provisioning or ready). Without a node pool
    (Container Apps, Azure ML) every pod has a place at once."""

    def __init__(
        self,
        env: simpy.Environment,
        pod_start_s: float,
        per_node: int | None,
        node_provision_s: float,
    ) -> None:
        import simpy

        self.env = env
        self.pod_start_s = pod_start_s
        self.per_node = per_node
        self.node_provision_s = node_provision_s
        self.ready = 0
        self.starting: list[simpy.Process] = []
        self.nodes_ready = 0
        self.nodes_pending = 0
        self.slots = simpy.Container(env, init=0) if per_node else None
        self.timeline: list[tuple[float, int, int, int]] = []

    @property
    def spec(self) -> int:
        return self.ready + len(self.starting)

    def record(self) -> None:
        self.timeline.append(
            (self.env.now, self.ready, self.spec, self.nodes_ready + self.nodes_pending)
        )

    def warm(self, replicas: int) -> None:
        """Start the trace with `replicas` ready (and their nodes), as after a quiet period."""
        self.ready = replicas
        if self.per_node and self.slots is not None:
            self.nodes_ready = math.ceil(replicas / self.per_node)
            free = self.nodes_ready * self.per_node - replicas
            if free:
                self.slots.put(free)
        self.record()

    def scale_to(self, replicas: int) -> None:
        while self.spec < replicas:
            self.starting.append(self.env.process(self._pod()))
        while self.spec > replicas:
            if self.starting:
                self.starting.pop().interrupt()  # the newest start is the one cancelled
            else:
                self.ready -= 1
                self._free_slot()
        self._provision_nodes()
        self.record()

    def _free_slot(self) -> None:
        if self.slots is not None:
            self.slots.put(1)

    def _pod(self) -> Generator[simpy.Event, Any, None]:
        import simpy

        holding = False
        try:
            if self.slots is not None:
                request = self.slots.get(1)
                try:
                    yield request
                except simpy.Interrupt:
                    request.cancel()
                    return
                holding = True
            yield self.env.timeout(self.pod_start_s)
        except simpy.Interrupt:
            if holding:
                self._free_slot()
            return
        self.starting.remove(self.env.active_process)  # type: ignore[arg-type]
        self.ready += 1
        self.record()

    def _provision_nodes(self) -> None:
        if not self.per_node:
            return
        wanted = math.ceil(self.spec / self.per_node)
        for _ in range(wanted - self.nodes_ready - self.nodes_pending):
            self.nodes_pending += 1
            self.env.process(self._node())

    def _node(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(self.node_provision_s)
        assert self.slots is not None
        assert self.per_node
        self.nodes_pending -= 1
        self.nodes_ready += 1
        self.slots.put(self.per_node)
        self.record()

    def remove_idle_nodes(self, count: int) -> None:
        assert self.slots is not None
        assert self.per_node
        self.slots.get(count * self.per_node)  # the level is known to cover it
        self.nodes_ready -= count
        self.record()
