"""`batchserve cost`: GPU platforms priced only from a GPU figure, and what the comparison pays
beside the replicas (load balancer, internet egress, Redis), by hand against the small table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_cost as base

from batchserve.cost import CostError, PlanInputs, estimate, load_pricing

MONTH_REQUESTS = 1000 * 730 * 3600  # 2.628e9 at the 1,000 req/s default

# ---------------------------------------------------------------------------------------------
# capacity: a GPU platform needs a GPU figure


def cost_json(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "cost.json"
    assert base.run(*argv, "--json", str(out)) == 0
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_a_cpu_bench_file_leaves_every_gpu_platform_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = base.sweep_file(tmp_path / "sweep.json")
    data = cost_json(tmp_path, "--bench-json", str(sweep))
    printed = capsys.readouterr().out
    platforms = load_pricing().platforms
    gpu = {p.name for p in platforms if p.device == "gpu"}
    cpu = {p.name for p in platforms if p.device == "cpu"}
    assert gpu
    assert cpu
    assert {e["platform"] for e in data["estimates"]} == cpu
    assert {e["capacity_rps"] for e in data["estimates"]} == {2986}
    assert {s["platform"] for s in data["skipped"]} == gpu
    assert all("no GPU figure" in s["reason"] for s in data["skipped"])
    assert "left out:" in printed
    assert "no GPU figure" in printed
    for name in gpu:
        assert f"| {name} |" not in printed


def test_a_gpu_platform_is_priced_from_its_own_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cost_json(
        tmp_path, "--throughput", "3000", "--platforms", "aks-cpu,aks-gpu-h100,aks-gpu-t4",
        "--platform-throughput", "aks-gpu-h100=4400",
    )  # fmt: skip
    capsys.readouterr()
    rates = {e["platform"]: e["capacity_rps"] for e in data["estimates"]}
    assert rates == {"aks-cpu": 3000, "aks-gpu-h100": 4400}
    assert [s["platform"] for s in data["skipped"]] == ["aks-gpu-t4"]
    assert data["capacities"]["aks-gpu-h100"]["origin"] == "--platform-throughput aks-gpu-h100=4400"


def test_a_gpu_bench_file_sizes_its_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu = base.single_file(tmp_path / "gpu.json", 4000.0, 60.0)
    data = cost_json(
        tmp_path, "--platforms", "aks-gpu-t4", "--platform-bench-json", f"aks-gpu-t4={gpu}"
    )
    capsys.readouterr()
    (e,) = data["estimates"]
    assert (e["platform"], e["capacity_rps"]) == ("aks-gpu-t4", 4000.0)
    assert data["capacity"] is None
    assert data["skipped"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--throughput", "3000", "--platforms", "aks-gpu-t4"), "no platform has a capacity"),
        (("--platform-bench-json", "aks-gpu-t4"), "NAME=FILE"),
        (("--platform-throughput", "nope=5"), "unknown platform 'nope'"),
    ],
)
def test_no_figure_for_any_chosen_platform_is_an_error(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert base.run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchserve: error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# beside the replicas: load balancer, egress, Redis (small table: LB 0.02 USD/h + 0.01 USD/GB,
# egress 0.1 USD/GB with no free GB, Redis 0.05 USD/h)

SIZED = PlanInputs(
    target_rps=1000, availability=0.999, utilisation=0.5, request_bytes=500_000, response_bytes=1000
)


def test_data_and_redis_per_month_by_hand(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aks-edge"), pricing, 500, SIZED)
    # 1000 / 250 = 4 replicas + 1 spare on one-replica nodes; free control plane.
    assert (e.replicas, e.nodes) == (5, 5)
    processed_gb = MONTH_REQUESTS * 501_000 / 1e9  # 1,316,628 GB through the load balancer
    out_gb = MONTH_REQUESTS * 1000 / 1e9  # 2,628 GB of responses to the internet
    assert e.breakdown == pytest.approx({
        "nodes": 5 * 0.10 * 730,
        "control_plane": 0.0,
        "system_pool": 0.0,
        "load_balancer": 0.02 * 730 + processed_gb * 0.01,
        "egress": out_gb * 0.1,
        "redis": 0.05 * 730,
    })  # fmt: skip
    assert e.monthly_usd == pytest.approx(365 + 14.6 + 13_166.28 + 262.8 + 36.5)
    assert e.usd_per_million == pytest.approx(e.monthly_usd / 2628)
    # 500 kB bodies: the load balancer's data processing is 36 times the compute.
    assert e.breakdown["load_balancer"] > 30 * e.breakdown["nodes"]


def test_egress_applies_to_every_platform_and_the_balancer_only_to_aks(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    for name in ("aml", "aca", "aca-gpu", "aks"):
        e = estimate(pricing.platform(name), pricing, 500, SIZED)
        assert e.breakdown["egress"] == pytest.approx(2628 * 0.1), name
        assert "load_balancer" not in e.breakdown, name
        assert "redis" not in e.breakdown, name


def test_the_free_egress_is_spent_first(tmp_path: Path) -> None:
    table = base.small_table()
    table["prices"]["bandwidth"]["free_gb_per_month"] = 100
    pricing = load_pricing(base.write(tmp_path / "p.json", table))
    e = estimate(pricing.platform("aml"), pricing, 500, SIZED)
    assert e.breakdown["egress"] == pytest.approx((2628 - 100) * 0.1)
    small = PlanInputs(target_rps=1, request_bytes=10, response_bytes=10)
    assert estimate(pricing.platform("aml"), pricing, 500, small).breakdown["egress"] == 0.0


def test_without_sizes_no_data_is_priced(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aks-edge"), pricing, 500, base.INPUTS)
    assert "egress" not in e.breakdown
    assert e.breakdown["load_balancer"] == pytest.approx(0.02 * 730)  # its hours alone


@pytest.mark.parametrize(
    "sizes", [{"request_bytes": 10}, {"response_bytes": 10}, {"request_bytes": -1,
                                                               "response_bytes": 1}]
)  # fmt: skip
def test_sizes_come_in_pairs_and_are_not_negative(sizes: dict[str, float]) -> None:
    with pytest.raises(CostError, match=r"the response size|>= 0 bytes"):
        PlanInputs(**sizes)


def test_the_command_takes_sizes_from_flags_or_the_bench_file(
    tmp_path: Path, table_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = json.loads(base.sweep_file(tmp_path / "s.json").read_text())
    sized = base.write(tmp_path / "sized.json", sweep | {"request_bytes": 2000,
                                                        "response_bytes": 500})  # fmt: skip
    common = ("--pricing", str(table_path), "--platforms", "aml")
    from_file = cost_json(tmp_path, *common, "--bench-json", str(sized))
    (e,) = from_file["estimates"]
    assert (from_file["inputs"]["request_bytes"], from_file["inputs"]["response_bytes"]) == (
        2000, 500
    )  # fmt: skip
    assert e["breakdown"]["egress"] == pytest.approx(MONTH_REQUESTS * 500 / 1e9 * 0.1)
    flags = cost_json(tmp_path, *common, "--bench-json", str(sized), "--request-bytes", "1",
                      "--response-bytes", "4000")  # fmt: skip
    assert flags["estimates"][0]["breakdown"]["egress"] == pytest.approx(
        MONTH_REQUESTS * 4000 / 1e9 * 0.1
    )
    printed = capsys.readouterr().out
    assert "not priced" not in printed
    assert base.run(*common, "--throughput", "500", "--request-bytes", "1") == 2
    assert "both the request and the response" in capsys.readouterr().err


def test_the_report_says_what_is_not_priced(capsys: pytest.CaptureFixture[str]) -> None:
    assert base.run("--throughput", "3000", "--platforms", "aks-cpu") == 0
    printed = capsys.readouterr().out
    assert "| not priced |" in printed
    assert "data charges NOT priced" in printed
    for item in ("Log Analytics", "DNS", "Key Vault", "disks", "container registry"):
        assert item in printed


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    return base.write(tmp_path / "pricing.json", base.small_table())


# ---------------------------------------------------------------------------------------------
# docs/cost.md shows what the command prints

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cost.md"
SUITE = str(DOCS.parent / "results" / "suite.json") + "#sweeps.batchserve"


def test_the_documented_cpu_table_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("--bench-json", SUITE, "--platforms", "aml-cpu,aks-cpu,aca-cpu")
    assert base.run(*argv, "--request-bytes", "900", "--response-bytes", "450") == 0
    table = capsys.readouterr().out.split("\n\n")[0]
    assert table.count("\n") == 4
    assert table in DOCS.read_text()


def test_the_documented_gpu_figures_are_what_the_model_gives() -> None:
    pricing = load_pricing()
    text = DOCS.read_text()
    for target, row in ((1000, "2 (1 + 1)"), (20_000, "8 (7 + 1)")):
        inputs = PlanInputs(target_rps=target, request_bytes=602_500, response_bytes=4300)
        e = estimate(pricing.platform("aks-gpu-h100"), pricing, 4400, inputs)
        assert f"| {target:,} img/s | {row} | {e.breakdown['nodes']:,.2f} |" in text
        assert f"| {e.monthly_usd:,.2f} | {e.usd_per_million:,.4f} |" in text


def test_the_documented_exclusions_are_the_reported_ones() -> None:
    from batchserve.cost.report import EXCLUDED

    text = " ".join(DOCS.read_text().split())
    assert "; ".join(EXCLUDED) in text


def test_the_documented_targets_and_shapes_are_the_shipped_ones() -> None:
    pricing = load_pricing()
    text = " ".join(DOCS.read_text().split())
    target = {p.name: f"{p.in_flight_target:g}" for p in pricing.platforms if p.in_flight_target}
    assert (
        f"{target['aks-cpu']} for the CPU overlay and Container Apps CPU app, "
        f"{target['aks-gpu-t4']} for the `aks-gpu` overlay, "
        f"{target['aca-gpu-t4']} for the Container Apps GPU app"
    ) in text
    assert target["aks-cpu"] == target["aca-cpu"]
    aks, aml = pricing.platform("aks-cpu"), pricing.platform("aml-cpu")
    assert f"system pool ({aks.system_nodes} \u00d7 D4s_v5" in text
    assert f"the deployment's `instance_count` ({aml.min_replicas})" in text
