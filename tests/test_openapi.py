"""docs/openapi.yaml: a valid OpenAPI document that names exactly the routes the server
registers, and a schema-driven fuzz run (schemathesis) against a live `batchserve serve`
process: no 5xx, no undocumented status, body, header or content type, no hang, no crash,
bounded memory."""

from __future__ import annotations

import copy
import signal
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema_rs
import numpy as np
import onnxruntime as ort
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.errors import LoaderError
from schemathesis.core.failures import ServerError

from batchserve import Engine, ServerConfig, __version__
from batchserve.app import create_app
from batchserve.repository import ModelRepository

from helpers import ServerProcess

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
MODEL = "mlp"  # the served model (tests/conftest.py `mlp_path`)
# Mostly the served model, so that cases reach the infer body validation; an unknown name
# and version keep the 404 answers in the run.
NAMES = st.sampled_from([MODEL, MODEL, MODEL, "no-such-model"])
VERSIONS = st.sampled_from(["1", "1", "1", "2"])
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# Bounded so the run takes well under a minute on two cores; the coverage and examples phases
# add their deterministic cases to these.
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
REQUEST_TIMEOUT_S = 10  # a hang fails the case instead of the whole session
SHORT_DEADLINE_US = 1_000_000  # inference of the test model takes milliseconds
RSS_GROWTH = 2.0
RSS_SLACK_BYTES = 50 * 1024 * 1024

schema = schemathesis.openapi.from_path(DOCUMENT)


def test_the_document_is_valid_openapi() -> None:
    schema.validate()
    assert schema.raw_schema["openapi"].startswith("3.")
    assert schema.raw_schema["info"]["version"] == __version__


def test_the_validator_rejects_a_broken_document() -> None:
    """The check above can fail: the same loader refuses a document with a malformed part."""
    broken = copy.deepcopy(schema.raw_schema)
    broken["paths"]["/v2"]["get"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError, match="none"):
        schemathesis.openapi.from_dict(broken).validate()
    with pytest.raises(LoaderError):
        schemathesis.openapi.from_dict({"info": {"title": "no version"}, "paths": {}})


def documented_routes() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in schema.raw_schema["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch", "head", "options")
    }


def registered_routes(model_path: Path) -> set[tuple[str, str]]:
    app = create_app(ModelRepository([Engine(model_path)]), ServerConfig(port=0))
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # aiohttp answers HEAD for every GET route by itself; `*` is the JSON 404 catch-all.
        if route.method in ("HEAD", "*"):
            continue
        routes.add((route.method, path))
    return routes


def test_every_registered_route_is_documented_and_nothing_else(mlp_path: Path) -> None:
    registered = registered_routes(mlp_path)
    documented = documented_routes()
    assert registered - documented == set(), "routes the document lacks"
    assert documented - registered == set(), "documented routes the server does not have"
    assert len(registered) == 18


def test_every_operation_documents_its_error_statuses() -> None:
    paths = schema.raw_schema["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            statuses = set(operation["responses"])
            assert "200" in statuses, (method, path)
            if "{name}" in path:
                assert {"401", "404"} <= statuses, (method, path)
            if path.endswith("/infer"):
                expected = {"400", "401", "404", "408", "413", "429", "500", "503", "504"}
                assert expected <= statuses, (method, path)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class LiveServer(ServerProcess):
    """`batchserve serve` as a subprocess (see helpers.ServerProcess), and what the fuzz run
    sent it."""

    def __init__(self, args: Sequence[str], log_dir: Path, env: Mapping[str, str]) -> None:
        super().__init__(args, log_dir, env)
        self.baseline_rss = 0
        self.statuses: Counter[int] = Counter()
        self.phases: Counter[str] = Counter()


def start_server(model_path: Path, log_dir: Path) -> LiveServer:
    # The response cache and the access log are on so that their code runs under the fuzzer.
    # Load shedding on event-loop lag is off: on a busy test machine it would answer the
    # correctness checks with 429 (the fuzzed requests accept a 429 either way).
    return LiveServer.start(
        str(model_path), "--name", MODEL, "--cache-size-mb", "4", "--access-log",
        log_dir=log_dir, env={"BATCHSERVE_MAX_LOOP_LAG_MS": "0"},
    )  # fmt: skip


def sample_rows(rows: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def infer(session: requests.Session, url: str, inputs: np.ndarray) -> np.ndarray:
    body = {
        "id": "check",
        "inputs": [{"name": "input", "shape": list(inputs.shape), "datatype": "FP32",
                    "data": inputs.ravel().tolist()}],
    }  # fmt: skip
    response = session.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.fixture(scope="module")
def live_server(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(mlp_path, tmp_path_factory.mktemp("live_server"))
    try:
        with requests.Session() as session:
            for seed in range(20):  # warm-up, so first-run allocations count in the baseline
                infer(session, server.url, sample_rows(8, seed))
        server.baseline_rss = rss_bytes(server.process.pid)
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


# Schemathesis hooks, applied to the fuzz test only.


def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    if path_parameters is None:
        return st.none()
    chosen = {"name": NAMES}
    if "version" in path_parameters:
        chosen["version"] = VERSIONS
    return st.fixed_dictionaries(chosen)


def map_case(context: Any, case: schemathesis.Case) -> schemathesis.Case:
    # The coverage phase does not draw path parameters from strategies, so the hook above
    # never sees its cases: without this, all of them would ask for a model named "0".
    if case.meta is not None and case.meta.phase.name == "coverage" and case.path_parameters:
        case.path_parameters = {**case.path_parameters, "name": MODEL}
        if "version" in case.path_parameters:
            case.path_parameters["version"] = "1"
    # A fitted JSON body (below) with a random binary header length would only ever get 400.
    if fits_the_model(case.body):
        case.headers.pop("Inference-Header-Content-Length", None)
    return case


def fitted_inputs(rows: int, data: list[float]) -> list[dict[str, Any]]:
    return [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": data}]


def fits_the_model(body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return False
    inputs = body["inputs"]
    first = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], dict) else {}
    shape = first.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        return False
    return bool(inputs == fitted_inputs(shape[0], first.get("data")))


def valid_inputs() -> st.SearchStrategy[list[dict[str, Any]]]:
    def tensor(rows: int) -> st.SearchStrategy[list[dict[str, Any]]]:
        values = st.floats(-1e3, 1e3, width=32)
        data = st.lists(values, min_size=rows * 64, max_size=rows * 64)
        return data.map(lambda d: fitted_inputs(rows, d))

    return st.integers(0, 3).flatmap(tensor)


OUTPUTS = st.sampled_from(
    [None, [{"name": "probabilities"}],
     [{"name": "probabilities", "parameters": {"binary_data": True}}]]
)  # fmt: skip


def flatmap_body(context: Any, body: Any) -> Any:
    """Random bodies almost never fit the model; two in three JSON ones get inputs (and often
    outputs) that do, keeping the fuzzed `id` and `parameters`, so successful inference, binary
    outputs, deadlines and the cache are fuzzed too."""
    if not isinstance(body, dict):
        return st.just(body)

    def fitted(inputs: list[dict[str, Any]], outputs: Any) -> dict[str, Any]:
        fixed = {**body, "inputs": inputs}
        if outputs is not None:
            fixed["outputs"] = outputs
        return fixed

    fitted_body = st.builds(fitted, valid_inputs(), OUTPUTS)
    return st.sampled_from([True, True, False]).flatmap(
        lambda fit: fitted_body if fit else st.just(body)
    )


def requested_deadline_us(body: Any) -> Any:
    parameters = body.get("parameters") if isinstance(body, dict) else None
    return parameters.get("timeout") if isinstance(parameters, dict) else None


@schema.hook
def filter_failure(context: Any, failure: Any, case: schemathesis.Case, response: Any) -> bool:
    """504 is the documented answer when a request's own deadline (`parameters.timeout`, in
    microseconds) passes first; the fuzzer asks for deadlines of a few microseconds. Any other
    5xx, and a 504 without such a deadline, stays a failure."""
    deadline = requested_deadline_us(case.body)
    expected = type(deadline) is int and 0 < deadline < SHORT_DEADLINE_US
    return not (isinstance(failure, ServerError) and failure.status_code == 504 and expected)


@schema.hooks.apply(flatmap_body)
@schema.hooks.apply(map_case)
@schema.hooks.apply(flatmap_path_parameters)
# Unload is destructive by design (the model stops serving until a load): tested on its own in
# tests/test_repository.py, left out of the fuzz run so every other case reaches a live model.
@pytest.mark.slow
@schema.exclude(operation_id="repositoryUnload").parametrize()
@FUZZ
def test_fuzz_the_live_server(
    case: schemathesis.Case, live_server: LiveServer, http_session: requests.Session
) -> None:
    response = case.call(base_url=live_server.url, session=http_session, timeout=REQUEST_TIMEOUT_S)
    live_server.statuses[response.status_code] += 1  # counted before a failing check raises
    live_server.phases[str(case.meta.phase.name) if case.meta is not None else "explicit"] += 1
    case.validate_response(response, checks=CHECKS)


@pytest.mark.slow
def test_the_server_survived_the_fuzz_run(
    live_server: LiveServer, http_session: requests.Session, mlp_path: Path
) -> None:
    """Runs after the fuzz test (file order): still live, still right, memory bounded, and a
    clean drain with no error logged."""
    cases = sum(live_server.statuses.values())
    print(
        f"\nschemathesis: {cases} cases against {live_server.url}; "
        f"by status {dict(sorted(live_server.statuses.items()))}; "
        f"by phase {dict(live_server.phases)}"
    )
    url = live_server.url
    assert http_session.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}
    inputs = sample_rows(3, seed=99)
    expected = ort.InferenceSession(str(mlp_path)).run(None, {"input": inputs})[0]
    np.testing.assert_allclose(infer(http_session, url, inputs), expected, rtol=1e-5, atol=1e-6)

    rss = rss_bytes(live_server.process.pid)
    baseline = live_server.baseline_rss
    print(f"server RSS: {baseline / 2**20:.1f} MiB before the run, {rss / 2**20:.1f} MiB after")
    assert rss < RSS_GROWTH * baseline + RSS_SLACK_BYTES

    assert live_server.stop(signal.SIGTERM) == 0
    log = live_server.log.splitlines()
    errors = [line for line in log if " ERROR " in line or "Traceback" in line]
    assert errors == [], "\n".join(errors)
