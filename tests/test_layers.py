"""The package's layers as imports see them: light commands stay light, metrics read no HTTP."""

from __future__ import annotations

import subprocess
import sys

import pytest

import batchserve


def _run(code: str) -> None:
    # A fresh interpreter: this one has loaded everything already.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "code",
    [
        "import batchserve.cost, sys; "
        "assert 'onnxruntime' not in sys.modules and 'redis' not in sys.modules",
        "from batchserve import __version__; import sys; "
        "assert 'onnxruntime' not in sys.modules and 'redis' not in sys.modules",
    ],
)
def test_cost_and_the_version_load_neither_onnxruntime_nor_redis(code: str) -> None:
    _run(code)


def test_metrics_read_the_front_end_without_importing_it() -> None:
    _run(
        "import batchserve.metrics, sys; "
        "assert not [m for m in sys.modules if m.startswith('batchserve.http')]"
    )


def test_the_package_root_still_exports_the_engine() -> None:
    from batchserve.engine import Engine, EngineStatistics

    assert batchserve.Engine is Engine
    assert batchserve.EngineStatistics is EngineStatistics
    assert set(batchserve.__all__) <= set(dir(batchserve))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = batchserve.Nope  # type: ignore[attr-defined]


def test_the_grpc_front_end_reads_nothing_of_the_http_one() -> None:
    # What both front ends share lives below them (batchserve.front), so neither imports the other.
    _run(
        "import batchserve.rpc.server, sys; "
        "assert not [m for m in sys.modules if m.startswith('batchserve.http')], "
        "[m for m in sys.modules if m.startswith('batchserve.http')]"
    )
