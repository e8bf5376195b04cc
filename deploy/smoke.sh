#!/usr/bin/env bash
# One V2 inference over HTTP and one over gRPC against a deployed batchserve, as a client outside
# the cluster makes them: through the ingress, over TLS, with the API key. Exit status 0 when
# both answered with outputs.
#
#   deploy/smoke.sh [--model NAME] [--cacert FILE] [--plaintext] HTTP_URL GRPC_ADDRESS
#   BATCHSERVE_API_KEY=... deploy/smoke.sh https://batchserve.example.com grpc.batchserve.example.com:443
#
# HTTP_URL is the base URL (https://HOST); GRPC_ADDRESS is HOST:PORT, spoken over TLS unless
# --plaintext (a server reached without an ingress, e.g. through kubectl port-forward).
# --cacert trusts a private CA for both. The API key is read from $BATCHSERVE_API_KEY, never
# from an argument (arguments show in process lists). The request is one row of zeros shaped
# from the model's metadata. Needs curl and Python 3 with tritonclient[grpc] and numpy
# (pip install 'tritonclient[grpc]', or batchserve's own environment); $PYTHON picks the Python.
set -euo pipefail

model=model
cacert=
plaintext=false
usage() { sed -n '6,7p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=${2:?--model needs a name}; shift 2 ;;
    --cacert) cacert=${2:?--cacert needs a file}; shift 2 ;;
    --plaintext) plaintext=true; shift ;;
    -h|--help) usage ;;
    --*) echo "smoke.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || usage
http_url=${1%/}
grpc_address=$2
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The key goes to curl in a header file, so it never appears on a command line either.
headers=$work/headers
: > "$headers"
if [ -n "${BATCHSERVE_API_KEY:-}" ]; then
  printf 'Authorization: Bearer %s\n' "$BATCHSERVE_API_KEY" > "$headers"
fi
curl_opts=(--silent --show-error --max-time 60 --header "@$headers")
[ -n "$cacert" ] && curl_opts+=(--cacert "$cacert")

# GET or POST (with a body file); fails with the server's own error text on a non-200.
call() {
  local url=$1 body=${2:-} status
  local args=("${curl_opts[@]}" --output "$work/answer" --write-out '%{http_code}')
  [ -n "$body" ] && args+=(--header 'Content-Type: application/json' --data-binary "@$body")
  status=$(curl "${args[@]}" "$url") || { echo "smoke.sh: $url: no answer" >&2; exit 1; }
  if [ "$status" != 200 ]; then
    echo "smoke.sh: $url answered $status: $(head -c 500 "$work/answer")" >&2
    exit 1
  fi
}

call "$http_url/v2/health/ready"
call "$http_url/v2/models/$model"
cp "$work/answer" "$work/metadata.json"
"$python" - "$work/metadata.json" > "$work/request.json" <<'PY'
import json, math, sys
# One row of zeros per input: dynamic dimensions (-1) become 1.
metadata = json.load(open(sys.argv[1]))
inputs = []
for spec in metadata["inputs"]:
    shape = [1 if d < 0 else d for d in spec["shape"]]
    zero = {"BOOL": False, "BYTES": ""}.get(spec["datatype"], 0)
    inputs.append({"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                   "data": [zero] * math.prod(shape)})
json.dump({"inputs": inputs}, sys.stdout)
PY
call "$http_url/v2/models/$model/infer" "$work/request.json"
"$python" - "$work/answer" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
outputs = answer.get("outputs") or sys.exit("smoke.sh: HTTP answer without outputs")
print("http ok:", ", ".join(f"{o['name']} {o['shape']}" for o in outputs))
PY

# gRPC: the same request through tritonclient, with the key as `authorization` metadata.
"$python" - "$grpc_address" "$model" "$plaintext" "$cacert" <<'PY'
import os, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

address, model, plaintext, cacert = sys.argv[1:]
key = os.environ.get("BATCHSERVE_API_KEY")
headers = {"authorization": f"Bearer {key}"} if key else None
client = grpcclient.InferenceServerClient(
    address, ssl=plaintext != "true", root_certificates=cacert or None
)
if not client.is_server_ready(headers=headers, client_timeout=60):
    sys.exit("smoke.sh: gRPC: the server is not ready")
metadata = client.get_model_metadata(model, headers=headers, as_json=True, client_timeout=60)
inputs = []
for spec in metadata["inputs"]:
    shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
    tensor = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
    if spec["datatype"] == "BYTES":
        tensor.set_data_from_numpy(np.full(shape, b"", dtype=np.object_))
    else:
        tensor.set_data_from_numpy(np.zeros(shape, dtype=triton_to_np_dtype(spec["datatype"])))
    inputs.append(tensor)
result = client.infer(model, inputs, headers=headers, client_timeout=60).get_response(as_json=True)
outputs = result.get("outputs") or sys.exit("smoke.sh: gRPC answer without outputs")
print("grpc ok:", ", ".join(f"{o['name']} {[int(d) for d in o['shape']]}" for o in outputs))
PY
