"""Time the micro-benchmarks only when asked: `--benchmark-only` or `--benchmark-enable`.

A plain `pytest benchmarks/micro` then runs each benchmark body once (pytest-benchmark's
disabled mode), so the checks on every result still run, in a few seconds.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own (trylast) pytest_configure reads the option.
    if not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True
