"""A plain `InferenceSession.run` against a run through I/O binding, on the CPU provider.

    .venv/bin/python -m pytest benchmarks/micro/test_io_binding.py --benchmark-only \
        -p no:cacheprovider

`--io-binding auto` is off on CPU because of these figures (docs/gpu.md): binding saves no copy
there (ORT reads numpy inputs in place either way) and costs a few more Python calls per run.
Cases: the example mlp at 1 and 32 rows, the example resnet50 at 1 row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from batchserve.examples import write_example
from batchserve.runtime.binding import CpuBinding
from batchserve.runtime.metadata import ModelMetadata
from batchserve.runtime.session import run_session

CASES = {"mlp-1": ("mlp", 1), "mlp-32": ("mlp", 32), "resnet50-1": ("resnet50", 1)}
ROUNDS = {"mlp": 300, "resnet50": 8}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("io-binding")
    built: dict[str, Any] = {}
    for name in {model for model, _ in CASES.values()}:
        path = write_example(name, Path(folder) / f"{name}.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 4
        built[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return built


def inputs(session: Any, rows: int) -> list[np.ndarray]:
    metadata = ModelMetadata.from_session(session)
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((rows, *spec.shape[1:]), dtype=np.float32) for spec in metadata.inputs
    ]


def timed(benchmark: Any, model: str, fn: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
    result: list[np.ndarray] = benchmark.pedantic(
        fn, rounds=ROUNDS[model], iterations=1, warmup_rounds=2
    )
    return result


@pytest.mark.benchmark(group="io_binding")
@pytest.mark.parametrize("case", list(CASES))
def test_plain_run(benchmark: Any, sessions: dict[str, Any], case: str) -> None:
    model, rows = CASES[case]
    session = sessions[model]
    arrays = inputs(session, rows)
    names = tuple(node.name for node in session.get_inputs())
    outputs = timed(benchmark, model, lambda: run_session(session, arrays, names))
    assert outputs[0].shape[0] == rows


@pytest.mark.benchmark(group="io_binding")
@pytest.mark.parametrize("case", list(CASES))
def test_io_binding_run(benchmark: Any, sessions: dict[str, Any], case: str) -> None:
    model, rows = CASES[case]
    session = sessions[model]
    arrays = inputs(session, rows)
    binding = CpuBinding(session, ModelMetadata.from_session(session))
    outputs = timed(benchmark, model, lambda: binding.run(arrays))
    names = tuple(node.name for node in session.get_inputs())
    np.testing.assert_array_equal(outputs[0], run_session(session, arrays, names)[0])
    # The benchmark holds one round's answer while the next runs: two buffers, reused.
    assert binding.statistics().buffers <= 2
