"""The model's own ceiling: ONNX Runtime alone, in process, at the batch size that runs best.

    python benchmarks/raw_ort.py MODEL.onnx [--batches 1,8,32,64] [--seconds 3]

Prints JSON: rows per second per batch size and the best. Session options are ONNX Runtime's
defaults with full graph optimisation, one session, every core.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from batchserve.bench.workload import random_inputs
from batchserve.runtime import TensorSpec


def rows_per_second(session: ort.InferenceSession, rows: int, seconds: float) -> float:
    metadata = {"inputs": [TensorSpec.from_ort(n).as_dict() for n in session.get_inputs()]}
    feeds = random_inputs(metadata, rows, np.random.default_rng(0))
    session.run(None, feeds)  # first run per shape plans memory; not measured
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        session.run(None, feeds)
        runs += 1
    return runs * rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    by_batch = {
        int(b): rows_per_second(session, int(b), args.seconds) for b in args.batches.split(",")
    }
    best = max(by_batch, key=lambda b: by_batch[b])
    print(json.dumps({"rows_per_s": by_batch, "best_batch": best, "best": by_batch[best]}))


if __name__ == "__main__":
    main()
