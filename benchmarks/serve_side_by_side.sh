#!/usr/bin/env bash
# Ours and vLLM's OpenAI server side by side on one GPU, Llama-3.1-8B shape with dummy weights, at 5
# request rates: `shardserve bench serve` against both in one run, one set of plots (issue 24 item 3).
#
# Not run yet (written on a CPU-only machine, checked by reading). Device-machine recipe
# (../shared/device/README.md): build .whl/ (make-wheels.sh) and .vparts/ (make-vllm-parts.sh) once;
# copy the vLLM parts to /tmp/vp, one call per part (carry [".vparts/pNN"], `mkdir -p /tmp/vp && cp
# .vparts/pNN/* /tmp/vp/`); then, in the next call on the same warm machine, carry
# [".whl", "cluster/proto/gen"] and run:   bash benchmarks/serve_side_by_side.sh
#
# What it does: one folder holds the shape's config.json (the one `dummy:llama-3.1-8b` builds) and a
# word-level tokenizer over the same 128,256 ids ("t0" ... "t128255"), so vLLM's stream carries text;
# ours serves `dummy:llama-3.1-8b` (no tokenizer: our gRPC stream counts tokens itself). Each server
# gets 0.45 of the card's memory, the same max_model_len / max_num_seqs / max_num_batched_tokens; ours
# starts first, then vLLM (its memory profiling must not see ours allocating). The client sends the same seeded
# token-id prompts (lognormal, medians 200 in / 180 out) to ours over gRPC and vLLM over HTTP,
# Poisson arrivals, one endpoint at a time; goodput at TTFT <= 500 ms and ITL <= 50 ms.
# Results (results.json, the 3 PNGs, both servers' logs) go to $OUT. Budget for one 10-minute call:
# installs ~1 min, our start (vLLM's site unpacked meanwhile) then vLLM's (53-81 s) ~3 min, the bench
# what is left, ~3-4 min (80 requests per rate, lengths clipped to 1,024, so the slowest request ends
# in seconds); a cut run keeps the points that finished.
# Override with env: RATES, NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN, MAX_NUM_SEQS, MAX_BATCHED, MEM,
# VLLM_ENABLE_V1_MULTIPROCESSING.
set -u
OUT=${OUT:-/tmp/out}
RATES=${RATES:-4,8,16,32,64}
NUM_REQUESTS=${NUM_REQUESTS:-80}
INPUT_LEN=${INPUT_LEN:-200}
OUTPUT_LEN=${OUTPUT_LEN:-180}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
MAX_BATCHED=${MAX_BATCHED:-8192}
MEM=${MEM:-0.45}
MAX_LEN=4096  # >= the longest prompt + output (--max-len 1024 each)
OURS_HTTP=8100; OURS_GRPC=9100; VLLM_PORT=8200
WORK=/tmp/side-by-side
mkdir -p "$OUT" "$WORK"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done; sleep 5
            for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done; }
trap cleanup EXIT

# Our side: Ray + Serve from the carried wheels, the package itself installed in place.
WHL=${WHL:-.whl}  # the Ray wheels (make-wheels.sh); skipped when an earlier call on this machine installed them
if [ ! -d /tmp/site/ray ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
        || { echo "carry $WHL (../shared/device/make-wheels.sh $WHL)"; exit 1; }
fi
find cluster/proto/gen -type f -exec touch {} +  # carried stubs are newer than the .proto: no rebuild
# EXTRA_SITE: e.g. a folder with matplotlib for the plots (the GPU image has none)
OURS_ENV=(env PYTHONPATH=/tmp/site${EXTRA_SITE:+:$EXTRA_SITE} PATH=/tmp/site/bin:$PATH)
"${OURS_ENV[@]}" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1

wait_ready() {  # url name pid seconds [started-at, in $SECONDS]
    local t0=${5:-$SECONDS}
    until python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || { echo "$2 died; log tail:"; tail -30 "$OUT/$2.log"; exit 1; }
        [ $((SECONDS - t0)) -lt "$4" ] || { echo "$2 not ready after $4 s"; tail -30 "$OUT/$2.log"; exit 1; }
        sleep 2
    done
    echo "$2 ready after $((SECONDS - t0)) s"
}

cat > "$WORK/ours.yaml" <<EOF
ray: {address: null, namespace: side-by-side}
http: {host: 127.0.0.1, port: $OURS_HTTP}
grpc: {port: $OURS_GRPC}
ingress: {num_replicas: 2}
models:
  - name: bench
    source: dummy:llama-3.1-8b
    dtype: bfloat16
    device: cuda
    max_model_len: $MAX_LEN
    replicas: 1
    resources: {num_gpus_per_worker: 1, num_cpus_per_worker: 2}
    cache: {gpu_memory_utilization: $MEM, enable_prefix_caching: true}
    scheduler: {max_num_seqs: $MAX_NUM_SEQS, max_num_batched_tokens: $MAX_BATCHED, max_queue_len: 4096}
EOF

# Ours starts now (Ray, Serve, weights, warm-up) while vLLM's site and model folder are prepared;
# vLLM itself starts only after ours is up, since its memory profiling must not see ours allocating.
T_OURS=$SECONDS
"${OURS_ENV[@]}" python3 -m shardserve.cluster.cli serve "$WORK/ours.yaml" > "$OUT/ours.log" 2>&1 &
OURS_PID=$!
pids+=($OURS_PID)

# vLLM's side: its own site, from the parts in /tmp/vp.
if [ ! -d /tmp/vsite/vllm ]; then
    ls /tmp/vp/part.* >/dev/null 2>&1 || { echo "copy the vLLM parts to /tmp/vp first"; exit 1; }
    cat /tmp/vp/part.* | tar -C /tmp -xf - && python3 -m pip install -q --no-index --no-deps --no-compile \
        --target /tmp/vsite /tmp/sel/*.whl || exit 1
fi
VLLM_PATH=/tmp/vsite
# The OpenAI server needs uvicorn / fastapi; if the parts lack them, take them from the Ray wheels' site,
# after vLLM's own (so every package vLLM pins still comes from its site).
env PYTHONPATH=$VLLM_PATH python3 -c "import uvicorn, fastapi" 2>/dev/null \
    || { echo "vLLM site lacks uvicorn/fastapi: adding /tmp/site after it"; VLLM_PATH=/tmp/vsite:/tmp/site; }
# vLLM's serving default: the engine core in its own process (the offline recipe's
# VLLM_ENABLE_V1_MULTIPROCESSING=0 is for its LLM class; set it here only if that process fails to start).
VLLM_ENV=(env PYTHONPATH=$VLLM_PATH VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-1}
          VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1)

# The model folder vLLM loads with --load-format dummy.
"${OURS_ENV[@]}" python3 - "$WORK/model" <<'PY' || exit 1
import json, sys
from pathlib import Path
from shardserve.workers.models.dummy import dummy_config
from tokenizers import Tokenizer, models, pre_tokenizers

folder = Path(sys.argv[1])
config = dummy_config("llama-3.1-8b")
config.save_pretrained(folder)
tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer.save(str(folder / "tokenizer.json"))
(folder / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1", "eos_token": "t2",
    "model_max_length": config.max_position_embeddings}))
PY

wait_ready "http://127.0.0.1:$OURS_HTTP/health" ours "$OURS_PID" 300 "$T_OURS"

"${VLLM_ENV[@]}" python3 -m vllm.entrypoints.openai.api_server --model "$WORK/model" --load-format dummy \
    --served-model-name bench --dtype bfloat16 --max-model-len $MAX_LEN --gpu-memory-utilization "$MEM" \
    --max-num-seqs "$MAX_NUM_SEQS" --max-num-batched-tokens "$MAX_BATCHED" --enable-prefix-caching \
    --host 127.0.0.1 --port $VLLM_PORT > "$OUT/vllm.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$VLLM_PORT/health" vllm $! 240
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"

# What is left of one 10-minute call, less a minute for shutdown; results.json is rewritten after every point.
BENCH_S=$((540 - SECONDS))
echo "bench serve gets $BENCH_S s"
"${OURS_ENV[@]}" timeout "$BENCH_S" python3 -m shardserve.cluster.cli bench serve --model bench \
    --endpoint "ours=grpc://127.0.0.1:$OURS_GRPC" --endpoint "vllm=http://127.0.0.1:$VLLM_PORT" \
    --rates "$RATES" --num-requests "$NUM_REQUESTS" --num-warmup 16 --arrival poisson --seed 0 \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --sigma 0.8 --max-len 1024 --vocab-size 128256 \
    --slo-ttft-ms 500 --slo-itl-ms 50 --out-dir "$OUT" 2>&1 | tee "$OUT/bench_serve.log" | tail -24
