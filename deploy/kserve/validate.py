"""Check KServe manifests offline against the models of KServe's Python SDK.

    pip install kserve
    python deploy/kserve/validate.py deploy/kserve/servingruntime.yaml my-isvc.yaml ...

Each ServingRuntime, ClusterServingRuntime and InferenceService is built field by field from
the SDK's OpenAPI models (`kserve.models`, and the Kubernetes client's for the core types they
embed): every key must be a field of its model, every value of the field's type, and the
models' own checks (required fields, allowed values) run as each object is built. The SDK's
own deserializer skips keys it does not know, so a misspelt field would pass it silently.

Prints one line per object and exits 1 if any is invalid. Run it in a process of its own: the
kserve package registers the `inference.*` protobuf messages, which tritonclient (and so
batchserve) registers too, and one process cannot hold both.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import kserve.models
import kubernetes.client
import yaml

KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}
# The SDK writes list[X] and dict(str, X); the Kubernetes client List[X] and Dict[str, X].
LIST = re.compile(r"[lL]ist\[(.+)\]$")
DICT = re.compile(r"dict\(str, (.+)\)$|Dict\[str, (.+)\]$")
# Types written as a value: anything (free-form, int-or-string), or a quantity ("2", 1.5).
ANY = {"object"}
QUANTITY = {"ResourceQuantity"}


class Invalid(Exception):
    """A manifest that does not fit the models, with where (a dotted path) and why."""


def model_class(name: str) -> Any:
    for module in (kserve.models, kubernetes.client):
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    raise Invalid(f"no model named {name}")


def build(value: Any, kind: str, path: str) -> Any:
    """`value` as an instance of the OpenAPI type `kind` (a model name, list[...], dict(...))."""
    if (item := LIST.match(kind)) is not None:
        if not isinstance(value, list):
            raise Invalid(f"{path}: a list expected, got {value!r}")
        return [build(v, item[1], f"{path}[{i}]") for i, v in enumerate(value)]
    if (item := DICT.match(kind)) is not None:
        if not isinstance(value, dict):
            raise Invalid(f"{path}: a mapping expected, got {value!r}")
        inner = item[1] or item[2]
        return {k: build(v, inner, f"{path}.{k}") for k, v in value.items()}
    if kind in ANY:
        return value
    if kind in QUANTITY:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Invalid(f"{path}: a quantity expected, got {value!r}")
        return value
    if kind in PRIMITIVES:
        # A bool is an int to Python, never to Kubernetes.
        if isinstance(value, bool) != (kind == "bool") or not isinstance(value, PRIMITIVES[kind]):
            raise Invalid(f"{path}: {kind} expected, got {value!r}")
        return value
    return build_model(value, model_class(kind), path)


def build_model(value: Any, cls: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise Invalid(f"{path}: a {cls.__name__} mapping expected, got {value!r}")
    fields = {key: attribute for attribute, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise Invalid(f"{path}: not a field of {cls.__name__}: {', '.join(unknown)}")
    arguments = {
        fields[key]: build(v, cls.openapi_types[fields[key]], f"{path}.{key}")
        for key, v in value.items()
    }
    try:
        return cls(**arguments)
    except (ValueError, TypeError) as err:
        # Pydantic's messages (the Kubernetes client's models) take several lines.
        raise Invalid(f"{path}: {' / '.join(str(err).splitlines()[:2])}") from None


def check(document: Any) -> str:
    """What the document is (kind/name), or Invalid."""
    if not isinstance(document, dict):
        raise Invalid("not a mapping")
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in KINDS:
        raise Invalid(f"not a KServe kind this checks: {key[0]} {key[1]}")
    build_model(document, model_class(KINDS[key]), document["kind"])
    return f"{document['kind']}/{document.get('metadata', {}).get('name')}"


def main(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        for index, document in enumerate(yaml.safe_load_all(Path(path).read_text())):
            if document is None:
                continue
            try:
                print(f"{path}: {check(document)}: valid")
            except Invalid as err:
                print(f"{path}: document {index}: {err}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
