#!/usr/bin/env bash
# Issue 24's one-GPU serving figures in one device call (Llama-3.1-8B shape, dummy weights, bf16):
#   1. cold start from zero replicas, twice (serve_latency.py --cold-starts 2): the first round
#      compiles the kernels on a fresh machine, the second finds Triton's cache (target <= 20 s);
#   2. what the serving path adds to one request at a time, gRPC and HTTP (serve_latency.py);
#   3. cost metering on vs off, offline tok/s (cost_ab.py; target within 1 %).
# Device recipe (../shared/device/README.md): `../shared/device/make-wheels.sh .rwhl` once, then carry
# [".rwhl", "cluster/proto/gen"] and run `bash benchmarks/serve_gpu_checks.sh`. Logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.rwhl}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -d /tmp/site/ray ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
        || { echo "carry $WHL (../shared/device/make-wheels.sh $WHL)"; exit 1; }
fi
export PYTHONPATH=/tmp/site${EXTRA_SITE:+:$EXTRA_SITE} PATH=/tmp/site/bin:$PATH
find cluster/proto/gen -type f -exec touch {} +  # carried stubs are newer than the .proto: no rebuild
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
GPU=(--model dummy:llama-3.1-8b --device cuda --dtype bfloat16)
STEPS=${STEPS:-cold_start,latency,cost_ab}  # which of the three to run
run() {  # name seconds command...
    local name=$1 secs=$2; shift 2
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    echo "== $name (limit $secs s)"; local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? after $((SECONDS - t0)) s"
}
run cold_start "${COLD_S:-240}" python3 benchmarks/serve_latency.py "${GPU[@]}" --cold-starts 2 --max-tokens 4 \
    --json "$OUT/cold_start.json"
grep -a "^cold start" "$OUT/cold_start.log"
run latency "${LAT_S:-150}" python3 benchmarks/serve_latency.py "${GPU[@]}" --max-tokens 32 --num-requests 40 \
    --json "$OUT/latency.json"
grep -a -A12 "^model \|^grpc:\|^http:" "$OUT/latency.log" | grep -av "INFO\|WARN" | head -40
run cost_ab "${COST_S:-170}" python3 benchmarks/cost_ab.py --model dummy:llama-3.1-8b --device cuda \
    --num-requests 500 --rounds 2 --json "$OUT/cost_ab.json"
tail -12 "$OUT/cost_ab.log"
