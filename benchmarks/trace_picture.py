"""The trace picture of docs/observability.md, drawn from spans a real server exported.

A server with tracing on (`build_server`, the CLI's composition root) serves `wide-mlp` on one
ONNX Runtime session; concurrent clients each send a request in a trace of their own (a W3C
`traceparent`, as an instrumented caller would); the server exports its spans over OTLP/HTTP
to the in-process receiver of the tests (tests/otlp_receiver.py, the protocol's own messages),
and the figure is drawn from what arrived: each request's span and phases, each run's span,
and the links between them.

    python benchmarks/trace_picture.py   # writes docs/trace.png

Needs the `otel` and `bench` extras (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from batchserve.app import build_server  # noqa: E402
from batchserve.config import BatchConfig, RuntimeConfig, ServerConfig  # noqa: E402
from batchserve.examples import write_example  # noqa: E402
from batchserve.settings import ServeSettings  # noqa: E402
from batchserve.tracing import TracingConfig  # noqa: E402

from otlp_receiver import OtlpReceiver, Span  # noqa: E402

MODEL = REPO / "build" / "wide-mlp.onnx"
PHASE_COLOURS = {"decode": "#9ecae1", "queue": "#fdae6b", "inference": "#31a354",
                 "encode": "#756bb1"}  # fmt: skip


async def collect(clients: int, rounds: int) -> list[Span]:
    """Serve `rounds` waves of `clients` concurrent one-row requests, each in its own trace;
    the spans the server exported for them."""
    if not MODEL.exists():
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        write_example("wide-mlp", MODEL)
    async with OtlpReceiver() as receiver:
        settings = ServeSettings(
            model=str(MODEL), name="wide-mlp", runtime=RuntimeConfig(instances=1),
            batch=BatchConfig(max_batch_size=64),
            server=ServerConfig(host="127.0.0.1", port=0, grpc_port=None),
            tracing=TracingConfig(endpoint=receiver.url, schedule_delay_ms=50),
        )  # fmt: skip
        traces: list[str] = []
        async with build_server(settings) as server, aiohttp.ClientSession() as session:
            url = f"{server.url}/v2/models/wide-mlp/infer"
            async with session.get(f"{server.url}/v2/models/wide-mlp") as answer:
                shape = (await answer.json())["inputs"][0]["shape"]
            width = shape[-1]
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, width],
                                "data": np.full(width, 0.5).tolist()}]}  # fmt: skip

            async def one() -> None:
                trace_id = os.urandom(16).hex()
                traces.append(trace_id)
                headers = {"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
                async with session.post(url, json=body, headers=headers) as answer:
                    answer.raise_for_status()

            for _ in range(rounds):
                await asyncio.gather(*(one() for _ in range(clients)))
        # The server's close flushed its spans: every request's span is here.
        wanted = set(traces)
        await receiver.wait_for(
            lambda spans: (
                len({s.trace_id for s in spans if s.name.startswith("infer")} & wanted)
                == len(wanted)
            ),
            "every request's span",
        )
        return list(receiver.spans)


def draw(spans: list[Span], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    requests = sorted((s for s in spans if s.kind == "SERVER"), key=lambda s: s.start_ns)
    batches = sorted((s for s in spans if s.name.startswith("batch")), key=lambda s: s.start_ns)
    origin = min(s.start_ns for s in requests)

    def ms(ns: int) -> float:
        return (ns - origin) / 1e6

    rows = len(requests) + len(batches)
    fig, ax = plt.subplots(figsize=(11, 0.32 * rows + 1.6))
    batch_row = {b.span_id: len(requests) + i for i, b in enumerate(batches)}
    for row, request in enumerate(requests):
        ax.barh(row, ms(request.end_ns) - ms(request.start_ns), left=ms(request.start_ns),
                height=0.8, color="none", edgecolor="#555555", linewidth=0.6)  # fmt: skip
        for phase in spans:
            if phase.parent_span_id == request.span_id and phase.name in PHASE_COLOURS:
                ax.barh(row, max(ms(phase.end_ns) - ms(phase.start_ns), 0.002),
                        left=ms(phase.start_ns), height=0.55,
                        color=PHASE_COLOURS[phase.name])  # fmt: skip
        for link in request.links:  # request → the run that carried its rows
            if link.span_id in batch_row:
                inference = next(
                    (p for p in spans
                     if p.parent_span_id == request.span_id and p.name == "inference"), None,
                )  # fmt: skip
                x = ms(inference.start_ns) if inference else ms(request.start_ns)
                ax.plot([x, x], [row, batch_row[link.span_id]], color="#31a354", alpha=0.35,
                        linewidth=0.8)  # fmt: skip
    for batch in batches:
        row = batch_row[batch.span_id]
        ax.barh(row, ms(batch.end_ns) - ms(batch.start_ns), left=ms(batch.start_ns), height=0.8,
                color="#006d2c")  # fmt: skip
        label = (f"{batch.attributes['batchserve.batch.rows']} rows, "
                 f"{len(batch.links)} linked")  # fmt: skip
        ax.text(ms(batch.end_ns) + 0.05, row, label, va="center", fontsize=7)
    labels = [f"infer {r.trace_id[:6]}…" for r in requests]
    labels += [f"batch (session {b.attributes.get('batchserve.session', '?')})" for b in batches]
    ax.set_yticks(range(rows), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first request's span began")
    ax.set_title(
        f"{len(requests)} concurrent requests, {len(batches)} ONNX Runtime runs "
        "(spans exported over OTLP; lines are span links)",
        fontsize=9,
    )
    legend = [Patch(color=c, label=n) for n, c in PHASE_COLOURS.items()]
    legend.append(Patch(color="#006d2c", label="run (batch span)"))
    ax.legend(handles=legend, loc="upper right", fontsize=7)
    ax.set_xlim(right=ax.get_xlim()[1] * 1.08)  # room for the runs' labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "trace.png")
    args = parser.parse_args()
    spans = asyncio.run(collect(args.clients, args.rounds))
    draw(spans, args.out)


if __name__ == "__main__":
    main()
