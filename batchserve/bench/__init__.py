"""`batchserve bench` and `batchserve tune`: an open- and closed-loop load generator for V2
inference servers, and the settings search built on it."""

from batchserve.bench.command import run_bench
from batchserve.bench.errors import BenchError
from batchserve.bench.loadgen import LoadConfig, run_load
from batchserve.bench.measure import noop_server
from batchserve.bench.report import Report, summarize
from batchserve.bench.tune import trials_table, tune
from batchserve.bench.workload import Workload, build_workload

__all__ = [
    "BenchError",
    "LoadConfig",
    "Report",
    "Workload",
    "build_workload",
    "noop_server",
    "run_bench",
    "run_load",
    "summarize",
    "trials_table",
    "tune",
]
