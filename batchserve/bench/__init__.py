"""`batchserve bench`: an open- and closed-loop load generator for V2 inference servers."""

from batchserve.bench.loadgen import LoadConfig, run_load
from batchserve.bench.report import Report, summarize
from batchserve.bench.workload import Workload, build_workload

__all__ = ["LoadConfig", "Report", "Workload", "build_workload", "run_load", "summarize"]
