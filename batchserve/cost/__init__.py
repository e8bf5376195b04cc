"""Cost planning for batchserve deployments on Azure: a steady-state cost model per platform
(`model`), the pricing table it reads (`pricing`), and an autoscaling simulation over a
request-rate trace (`simulate`, with the fleet in `fleet`, the queue in front of it in
`queueing` and the scaling rules and delays in `rules`). The CLI front end is
`batchserve.cost.command`.

SimPy and matplotlib (the `cost` extra) are imported only by the functions that need them.
"""

from batchserve.cost.capacity import Capacity, LatencyCurve, read_bench_json, read_sweep_curve
from batchserve.cost.errors import CostError
from batchserve.cost.model import Estimate, PlanInputs, estimate, replicas_for_load, spare_nodes
from batchserve.cost.pricing import Platform, Pricing, load_pricing

__all__ = [
    "Capacity",
    "CostError",
    "Estimate",
    "LatencyCurve",
    "PlanInputs",
    "Platform",
    "Pricing",
    "estimate",
    "load_pricing",
    "read_bench_json",
    "read_sweep_curve",
    "replicas_for_load",
    "spare_nodes",
]
