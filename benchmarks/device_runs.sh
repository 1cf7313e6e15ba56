#!/usr/bin/env bash
# The device-machine runs behind the figures in benchmarks/NOTES.md, one function per device call.
# Run from the repo root on the device machine:  bash benchmarks/device_runs.sh <function>
# Results go under $OUT (the device tool brings that folder back). Ray / Serve runs need the
# wheels from ../shared/device/make-wheels.sh carried as .whl/ and the generated gRPC stubs
# (cluster/proto/gen); see ../shared/device/README.md.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

ns() {  # import the working tree as `shardserve.*` without installing it
    mkdir -p /tmp/ns/shardserve
    for d in cluster workers parallel; do ln -sfn "$PWD/$d" "/tmp/ns/shardserve/$d"; done
    export PYTHONPATH=/tmp/ns
}

ray_site() {  # Ray + Serve from carried wheels, beside the machine's torch
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
    find cluster/proto/gen -type f -exec touch {} +
    export PYTHONPATH=/tmp/site:/tmp/ns
}

sweep_tiles() {  # this card's projection tiles into /tmp/gemv_tiles.json (and $OUT); args go to gemv_gpu.py
    timeout 150 python3 benchmarks/gemv_gpu.py "$@" --sweep --write-tiles /tmp/gemv_tiles.json 2>&1 | grep -v Warning \
        | tee "$OUT/gemv_gpu.log" | grep -A4 "^device\|^per layer"
    cp /tmp/gemv_tiles.json "$OUT/" 2>/dev/null
}

# One GPU: kernels compiled at full size, fused MoE check, the single-GPU bench (issue 3).
one_gpu() {
    ns
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels \
        --ignore=tests/kernels/test_mixed_graph_forward.py 2>&1 | tail -3
    timeout 90 python3 benchmarks/moe_gpu_check.py --iters 20 2>&1 | tee "$OUT/moe_gpu_check.log" | tail -12
    timeout 330 python3 benchmarks/gpu_bench.py --out "$OUT" --max-num-seqs 512 --skip kernels 2>&1 \
        | grep -v Warning | tee "$OUT/gpu_bench.log" | tail -22
}

# One GPU (eighth session): batch-1 / 8 decode with programmatic dependent launch (the default),
# the fast-path check and transformers beside it, then batch 1 with PDL off, A B A on one card.
one_gpu_pdl() {
    ns
    timeout 200 python3 benchmarks/gpu_bench.py --out "$OUT/pdl-on" --batch-sizes 1,8 --skip kernels throughput 2>&1 \
        | grep -v Warning | tee "$OUT/gpu_bench_pdl_on.log" | grep "latency\|device\|check\|transformers\|ratio"
    SHARDSERVE_PDL=0 timeout 100 python3 benchmarks/gpu_bench.py --out "$OUT/pdl-off" --batch-sizes 1 \
        --skip kernels check throughput hf 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_pdl_off.log" | grep "latency\|copy"
    timeout 100 python3 benchmarks/gpu_bench.py --out "$OUT/pdl-on2" --batch-sizes 1 \
        --skip kernels check throughput hf 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_pdl_on2.log" | grep "latency\|copy"
}

# One GPU (ninth session), call 1: the decode-size projection kernel (workers/kernels/decode_linear.py)
# compiled on the card, then cuBLAS vs ours per TP shard shape with a tile sweep; the tuned table
# stays in /tmp for call 2 on the same warm machine.
one_gpu_gemv() {
    ns
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_decode_linear.py \
        tests/kernels/test_rmsnorm.py tests/kernels/test_activation.py 2>&1 | tail -2
    timeout 420 python3 benchmarks/gemv_gpu.py --sweep --write-tiles /tmp/gemv_tiles.json 2>&1 | grep -v Warning \
        | tee "$OUT/gemv_gpu.log"
    cp /tmp/gemv_tiles.json "$OUT/" 2>/dev/null
}

# One H200 (tenth session): its projection tiles swept (no table is shipped for it), then batch-1
# decode with cuBLAS and with the tuned table on the same card. Exits at once on another card.
one_gpu_h200_tiles() {
    ns
    nvidia-smi -L | grep -q H200 || { echo "not an H200: $(nvidia-smi -L | head -1)"; return 0; }
    sweep_tiles
    for env in SHARDSERVE_DECODE_GEMV=0 SHARDSERVE_GEMV_TILES=/tmp/gemv_tiles.json; do
        env $env timeout 110 python3 benchmarks/gpu_bench.py --out "$OUT/${env%%=*}" --batch-sizes 1 \
            --skip kernels check throughput hf 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_${env%%=*}.log" \
            | grep "latency\|copy"
    done
}

# One GPU (ninth session), call 2: batch-1 / 8 decode with the projection kernel (default tiles;
# the fast-path check and transformers beside it), then batch 1 with cuBLAS, with the tuned
# tiles of call 1, and with the kernel again: A B C A on one card.
one_gpu_gemv_e2e() {
    ns
    timeout 170 python3 benchmarks/gpu_bench.py --out "$OUT/gemv-on" --batch-sizes 1,8 --skip kernels throughput 2>&1 \
        | grep -v Warning | tee "$OUT/gpu_bench_gemv_on.log" | grep "latency\|device\|check\|transformers\|ratio"
    for variant in off tuned on2; do
        case $variant in
            off) env="SHARDSERVE_DECODE_GEMV=0" ;;
            tuned) env="SHARDSERVE_GEMV_TILES=/tmp/gemv_tiles.json" ;;
            *) env="SHARDSERVE_DECODE_GEMV=1" ;;
        esac
        env $env timeout 110 python3 benchmarks/gpu_bench.py --out "$OUT/gemv-$variant" --batch-sizes 1,8 \
            --skip kernels check throughput hf 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_gemv_$variant.log" \
            | grep "latency\|copy"
    done
}

# One GPU: the single-GPU bench with synchronous steps, then with async scheduling (same machine).
one_gpu_async_ab() {
    ns
    timeout 300 python3 benchmarks/gpu_bench.py --out "$OUT/sync" --max-num-seqs 512 --skip kernels --async-scheduling off 2>&1 \
        | grep -v Warning | tee "$OUT/gpu_bench_sync.log" | tail -14
    timeout 240 python3 benchmarks/gpu_bench.py --out "$OUT/async" --max-num-seqs 512 --skip kernels hf \
        --async-scheduling on 2>&1 | grep -v Warning | tee "$OUT/gpu_bench_async.log" | tail -14
}

# One GPU: where the step time goes (kernel profile per step, dense and MoE).
one_gpu_profile() {
    ns
    timeout 200 python3 benchmarks/profile_gpu.py --out "$OUT/profile" 2>&1 | grep -v Warning \
        | tee "$OUT/profile_gpu.log" | tail -40
    timeout 200 python3 benchmarks/profile_gpu.py --out "$OUT/profile-moe" --model dummy:qwen3-30b-a3b --num-layers 24 \
        2>&1 | grep -v Warning | tee "$OUT/profile_moe.log" | tail -20
}

# One GPU: the MoE kernels compiled on the card, the MoE check, then the MoE tile sweep.
one_gpu_kernels() {
    ns
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_moe_align.py \
        tests/kernels/test_fused_moe.py -rf 2>&1 | tail -4
    timeout 90 python3 benchmarks/moe_gpu_check.py --iters 20 2>&1 | grep -v Warning | tee "$OUT/moe_gpu_check.log" | tail -14
    timeout 210 python3 benchmarks/moe_gpu_check.py --sweep --budget-s 180 2>&1 | grep -v Warning \
        | tee "$OUT/moe_sweep.log" | tail -45
}

# One GPU: vLLM 0.24 and our engine back to back on the same card, same workloads (issue 3).
# Needs the vLLM parts copied to /tmp/vp first (../shared/device/README.md: one call per part).
one_gpu_vs_vllm() {
    ns
    vllm_site
    PYTHONPATH=/tmp/vsite:/tmp/ns VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
        HF_HUB_OFFLINE=1 timeout 270 python3 benchmarks/vllm_bench.py --out "$OUT" 2>&1 | grep -v Warning \
        | tee "$OUT/vllm_bench.log" | tail -3
    timeout 300 python3 benchmarks/gpu_bench.py --out "$OUT" --max-num-seqs 512 --skip kernels 2>&1 | grep -v Warning \
        | tee "$OUT/gpu_bench.log" | tail -16
}

# One GPU: our offline figure at vLLM's own limits on the card (vllm_bench.py prints them:
# 1,024 running / 16,384 tokens per step on an H100); run it in the call after one_gpu_vs_vllm.
one_gpu_vllm_limits() {
    ns
    timeout 400 python3 benchmarks/gpu_bench.py --out "$OUT/vllm-limits" --max-num-seqs 1024 \
        --max-num-batched-tokens 16384 --skip kernels check latency hf 2>&1 | grep -v Warning \
        | tee "$OUT/gpu_bench_vllm_limits.log" | tail -6
}

vllm_site() {  # vLLM 0.24 from the parts copied to /tmp/vp (../shared/device/README.md: one call per part)
    [ -d /tmp/vsite/vllm ] || { cat /tmp/vp/part.* | tar -C /tmp -xf - && python3 -m pip install -q --no-index \
        --no-deps --no-compile --target /tmp/vsite /tmp/sel/*.whl >/dev/null 2>&1; }
}

# Two GPUs: Qwen3-30B-A3B with vLLM 0.24 at TP 2 and TP 2 + EP (batch 1 and 1,000 lognormal
# requests), then ours at the same limits (issue 4's MoE figures on the same cards).
# MOE_PART=vllm | ours | both (default): the two halves fit one 10-minute call each.
two_gpu_moe_vs_vllm() {
    ns
    if [ "${MOE_PART:-both}" != ours ]; then
        vllm_site
        for ep in "" --ep; do
            PYTHONPATH=/tmp/vsite:/tmp/ns VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
                VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 timeout 280 python3 benchmarks/vllm_bench.py --out "$OUT" \
                --shape qwen3-30b-a3b --tp 2 $ep > "$OUT/vllm_moe_tp2${ep}.log" 2>&1
            tail -2 "$OUT/vllm_moe_tp2${ep}.log"
        done
    fi
    if [ "${MOE_PART:-both}" != vllm ]; then
        timeout 570 python3 benchmarks/parallel_gpu.py --cases moelat,epwide --num-requests 1000 --case-timeout-s 240 \
            --out "$OUT/parallel" 2>&1 | tee "$OUT/parallel_moe.log" | tail -8
    fi
}

# Two GPUs: the MoE decode-path kernels compiled on the card (direct rows, router launch, rotary
# with Qwen3's q/k norm), the MoE check with the router launch sweep, then MoE batch-1 decode at
# TP 2 and TP 2 + EP 2 (vLLM on the same cards: two_gpu_moe_vs_vllm).
two_gpu_moe_latency() {
    ns
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused_moe.py \
        tests/kernels/test_rotary.py -rf 2>&1 | tail -3
    timeout 100 python3 benchmarks/moe_gpu_check.py --iters 20 2>&1 | grep -v Warning | tee "$OUT/moe_gpu_check.log" | tail -24
    timeout 300 python3 benchmarks/parallel_gpu.py --cases moelat --case-timeout-s 140 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_moelat.log" | tail -4
}

# Two GPUs, first call of the next session: what the fourth session landed without running it on
# the GPUs. PP stages on the overlapped rank loop (token equality with one GPU, NCCL + CUDA graphs,
# 2-4 micro-batches, preemption), the kernels compiled (fp32 MoE tiles, q/k norm in the rotary
# kernel), then the PP figures with the overlapped last stage.
two_gpu_validate_s4() {
    ns
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_pp_microbatch_gpu.py -rf 2>&1 | tail -4
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py \
        tests/kernels/test_rotary.py tests/kernels/test_moe_align.py -rf 2>&1 | tail -4
    timeout 240 python3 benchmarks/parallel_gpu.py --cases ppmb --case-timeout-s 110 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_ppmb.log" | tail -5
}

# Two GPUs: the bench CLI on a worker group (added in the fourth session, not yet run on GPUs):
# batch-1/8 latency at TP 2 and throughput at TP 2, each beside transformers on one device.
two_gpu_fused() {  # fused all-reduce + RMSNorm: engine and kernel checks on the GPUs, then per-call timings
    ns
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_fused_allreduce_gpu.py -rf -x \
        > "$OUT/fused_engine_tests.log" 2>&1
    local rc=$?; tail -4 "$OUT/fused_engine_tests.log"
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider \
        tests/kernels/test_allreduce_rmsnorm.py -rf 2>&1 | tail -3
    [ $rc = 0 ] || return $rc  # the figures need the engine path to work
    timeout 150 torchrun --nproc-per-node 2 benchmarks/fused_allreduce_gpu.py 2>&1 | grep -v Warning \
        | tee "$OUT/fused_allreduce_gpu.log" | tail -9
}
two_gpu_fused_figures() {  # right after two_gpu_fused, same machine: TP 1 / TP 2 unfused / fused / Lamport, profile
    ns
    timeout 300 python3 benchmarks/parallel_gpu.py --cases tpfused --case-timeout-s 110 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_tpfused.log" | tail -5
    timeout 150 python3 benchmarks/profile_tp.py --tp 2 --cases b1 --out "$OUT/profile-tp" 2>&1 | grep -v Warning \
        | tee "$OUT/profile_tp.log" | tail -28
}
two_gpu_ws() {  # cuBLAS without workspace (no split-K reduce kernels): TP 1 b1 / b8 % of copy, TP 1 / 2 A/B; PP trace
    ns
    for ws in default :0:0; do
        [ $ws = default ] && unset CUBLAS_WORKSPACE_CONFIG || export CUBLAS_WORKSPACE_CONFIG=$ws
        timeout 120 python3 benchmarks/gpu_bench.py --out "$OUT/ws-${ws//:/}" \
            --skip kernels check throughput hf --batch-sizes 1,8 2>&1 | grep -v Warning > "$OUT/gpu_bench_ws-${ws//:/}.log"
        echo "ws $ws: $(grep -h 'copy bandwidth\|graphs=True' "$OUT/gpu_bench_ws-${ws//:/}.log" | tr '\n' ' ')"
    done
    timeout 200 python3 benchmarks/parallel_gpu.py --cases tpws --case-timeout-s 90 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_tpws.log" | tail -5
    two_gpu_trace_pp
}
two_gpu_pp_window() {  # PP 2 x 3 under ppmb's workload: both stages' busy / idle over 30 steps; driver cap
    ns
    timeout 60 python3 benchmarks/driver_overhead.py --num-requests 3072 --max-num-seqs 1536 --micro-batches 3 2>&1 \
        | grep -v Warning | tail -1
    timeout 60 python3 benchmarks/driver_overhead.py --num-requests 3072 --max-num-seqs 512 --pp 1 2>&1 \
        | grep -v Warning | tail -1
    # steady decode of the first wave (150 steps in), then the first prefill wave (5 steps in)
    for warm in ${PP_WINDOW_WARM:-150 5}; do
        SHARDSERVE_PROFILE_TRACE_DIR="$OUT/trace-ppw-$warm" timeout 240 python3 benchmarks/pp_window_trace.py \
            --warm-steps "$warm" 2>&1 | grep -v "Warning\|INFO\|USDT\|_warn_once" | tee "$OUT/pp_window_$warm.log" | tail -16
        gzip -f "$OUT/trace-ppw-$warm"/*.json
    done
}
two_gpu_ppbal() {  # PP 2: 17 / 15 layer split with 3 micro-batches, and 4 micro-batches, vs PP 1
    ns
    timeout 330 python3 benchmarks/parallel_gpu.py --cases ppbal --case-timeout-s 110 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_ppbal.log" | tail -5
}
two_gpu_trace_tp() {  # TP 2 batch-1 decode: each rank's Chrome trace (host launches and kernels), gzipped
    ns
    SHARDSERVE_PROFILE_TRACE_DIR="$OUT/trace-tp2" timeout 150 python3 benchmarks/profile_tp.py --tp 2 --cases b1 \
        --out "$OUT/profile-tp-trace" 2>&1 | grep -v Warning | tail -3
    gzip -f "$OUT"/trace-tp2/*.json; ls -la "$OUT/trace-tp2"
}
two_gpu_trace_pp() {  # PP 2 under decode load (400 running, 2 micro-batches): both stages' Chrome traces
    ns
    SHARDSERVE_PROFILE_TRACE_DIR="$OUT/trace-pp2" timeout 200 python3 benchmarks/profile_tp.py --tp 1 --pp 2 \
        --cases decode400 --out "$OUT/profile-pp-trace" 2>&1 | grep -v Warning | tail -12
    gzip -f "$OUT"/trace-pp2/*.json; ls -la "$OUT/trace-pp2"
}
two_gpu_bench_cli() {
    ns
    timeout 280 python3 -m shardserve.cluster.cli bench latency --model dummy:llama-3.1-8b --device cuda -tp 2 \
        --batch-sizes 1,8 --output-len 128 --json "$OUT/bench_latency_tp2.json" 2>&1 | grep -v Warning \
        | tee "$OUT/bench_latency_tp2.log" | tail -8
    timeout 280 python3 -m shardserve.cluster.cli bench throughput --model dummy:llama-3.1-8b --device cuda -tp 2 \
        --num-requests 256 --hf-num-requests 16 --json "$OUT/bench_throughput_tp2.json" 2>&1 | grep -v Warning \
        | tee "$OUT/bench_throughput_tp2.log" | tail -8
}

# Two GPUs: PP 1 vs PP 2 with 2 and 3 micro-batches in flight (fixed lengths, 3,072 requests).
two_gpu_ppmb() {
    ns
    timeout 570 python3 benchmarks/parallel_gpu.py --cases "${PP_CASES:-ppmb}" --case-timeout-s 200 \
        --out "$OUT/parallel" 2>&1 | tee "$OUT/parallel_ppmb.log" | tail -5
}

# Two GPUs (seventh session): the PP figure's pair with each run's step timeline, cold and after
# a full unmeasured run of the workload (is the rest of PP 2's loss one-time costs or bubbles?).
two_gpu_ppfig() {
    ns
    timeout 590 python3 benchmarks/parallel_gpu.py --cases "${PP_CASES:-ppfig,ppfigwarm}" --case-timeout-s 200 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_ppfig.log" | tail -6
    grep -h -A 13 "^timeline" "$OUT"/parallel/*.log | cut -c1-240
}

# Two GPUs: the small-message all-reduce, then TP / EP / PP figures (issue 4).
two_gpu_parallel() {
    ns
    timeout 120 torchrun --nproc-per-node 2 benchmarks/allreduce_gpu.py 2>&1 | tee "$OUT/allreduce_gpu.log" | tail -30
    timeout 420 python3 benchmarks/parallel_gpu.py --cases tp,ep,pp --num-requests 300 --case-timeout-s 150 \
        --out "$OUT/parallel" 2>&1 | tee "$OUT/parallel_gpu.log" | tail -14
}

# Two GPUs: where a TP 2 batch-1 decode step's time goes, rank by rank (kernel profile on every
# rank: all-reduces, small kernels, GEMMs), dense then MoE.
two_gpu_profile_tp() {
    ns
    timeout 240 python3 benchmarks/profile_tp.py --tp 2 --cases b1 --out "$OUT/profile-tp" 2>&1 | grep -v Warning \
        | tee "$OUT/profile_tp.log" | tail -40
    timeout 320 python3 benchmarks/profile_tp.py --tp 2 --cases b1 --model dummy:qwen3-30b-a3b --out "$OUT/profile-tp-moe" \
        2>&1 | grep -v Warning | tee "$OUT/profile_tp_moe.log" | tail -40
}

# Four GPUs: batch-1 decode at TP 1 / 2 / 4 (the issue's scaling figures).
four_gpu_tp() {  # TP 1 / 2 / 4 batch-1 decode with the fused all-reduce (the issue's scaling figures)
    ns
    timeout 400 python3 benchmarks/parallel_gpu.py --cases tp --case-timeout-s 120 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_tp.log" | tail -6
}

# Four GPUs (eighth session): the scaling figures, then where a TP 4 batch-1 step's time goes.
four_gpu_tp_profile() {
    four_gpu_tp
    timeout 200 python3 benchmarks/profile_tp.py --tp 4 --cases b1 --out "$OUT/profile-tp4" 2>&1 | grep -v Warning \
        | tee "$OUT/profile_tp4.log" | tail -45
}

# Four GPUs (eighth session): programmatic dependent launch. The kernels compiled on the card
# (PDL on), the fused all-reduce on 2 real GPUs, then TP 1 / 2 / 4 batch-1 decode with PDL off and on.
four_gpu_pdl() {
    ns
    # 150 s was too short in the eighth session (killed before its summary line): 300
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/kernels \
        --ignore=tests/kernels/test_mixed_graph_forward.py 2>&1 | tail -3
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/parallel/test_fused_allreduce_norm.py 2>&1 | tail -3
    for pdl in 0 1; do
        SHARDSERVE_PDL=$pdl timeout 240 python3 benchmarks/parallel_gpu.py --cases tp --case-timeout-s 100 \
            --out "$OUT/parallel-pdl$pdl" 2>&1 | tee "$OUT/parallel_tp_pdl$pdl.log" | grep "^tp "
    done
}

# Four GPUs: TP 4 batch-1 decode, every rank's Chrome trace (host launches and kernels), gzipped.
four_gpu_trace_tp() {
    ns
    SHARDSERVE_PROFILE_TRACE_DIR="$OUT/trace-tp4" timeout 200 python3 benchmarks/profile_tp.py --tp 4 --cases b1 \
        --out "$OUT/profile-tp4-trace" 2>&1 | grep -v Warning | tail -3
    gzip -f "$OUT"/trace-tp4/*.json; ls -la "$OUT/trace-tp4"
}

reap() {  # ranks left by a run its `timeout` killed (it kills only its child, not the spawned ranks)
    local stale
    stale=$(pgrep -f "[m]ultiprocessing.spawn|[m]ultiprocessing.forkserver" | wc -l)
    [ "$stale" -gt 0 ] && { echo "reap: killing $stale stale spawned processes"; pkill -9 -f "[m]ultiprocessing.spawn|[m]ultiprocessing.forkserver"; sleep 2; }
    return 0
}

# Four GPUs: TP 1 / 2 / 4 batch-1 decode with every rank's step timing (bench/rank_timing.py):
# is each rank's host keeping its device fed?
four_gpu_tp_timing() {
    ns
    reap  # a timed run must not share the GPUs and cores with a killed run's ranks
    timeout "${TP_TIMEOUT:-300}" python3 benchmarks/parallel_gpu.py --cases "${TP_CASES:-tp}" --case-timeout-s 100 --out "$OUT/parallel" 2>&1 \
        | tee "$OUT/parallel_tp.log" | grep "^tp"
    grep -H "^rank" "$OUT"/parallel/*.log | sed 's/.*kindlatency-//'
}

# Four GPUs (prepared in the eighth session, not run yet): the L2 weight prefetch. Its kernel
# compiled on the card, then TP 2 / 4 batch-1 decode without it, with 16 and 32 MB caps, without.
four_gpu_l2() {
    ns
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_l2_prefetch.py \
        tests/kernels/test_pdl.py 2>&1 | tail -2
    SHARDSERVE_L2_PREFETCH_MB=16 timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
        tests/parallel/test_tp_fused_allreduce_gpu.py 2>&1 | tail -2  # TP 2 tokens with the prefetch on
    TP_CASES=tpl2 TP_TIMEOUT=480 four_gpu_tp_timing
}

# Four GPUs (ninth session): the batch-1 projection kernel. Its tiles swept on GPU 0 (the table
# stays in /tmp and is used below), then TP 1 / 2 / 4 batch-1 decode with cuBLAS and with it.
four_gpu_gemv() {
    ns
    sweep_tiles
    SHARDSERVE_GEMV_TILES=/tmp/gemv_tiles.json TP_CASES=tpgemv TP_TIMEOUT=420 four_gpu_tp_timing
}

# Four GPUs (tenth session): the projection tiles swept for this card (a card without a shipped
# table, e.g. the H200), then TP 1 / 2 / 4 batch-1 decode with that table.
four_gpu_tp_tuned() {
    ns
    sweep_tiles
    SHARDSERVE_GEMV_TILES=/tmp/gemv_tiles.json TP_CASES=tp TP_TIMEOUT=400 four_gpu_tp_timing
}

# Two GPUs (tenth session): the same for TP 1 / 2 on a two-card machine (H200: no shipped table).
two_gpu_tp_tuned() {
    ns
    sweep_tiles --tp 1 2
    SHARDSERVE_GEMV_TILES=/tmp/gemv_tiles.json TP_CASES=tp12 TP_TIMEOUT=300 four_gpu_tp_timing
}

# Four GPUs (ninth session): TP 2 tokens on two GPUs with the kernel (and the fused all-reduce),
# the kernel tests compiled on the card, then TP 1 / 4 with the step-time means.
four_gpu_gemv_check() {
    ns
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/parallel/test_tp_fused_allreduce_gpu.py 2>&1 | tail -2
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_decode_linear.py \
        tests/kernels/test_pdl.py 2>&1 | tail -2
    TP_CASES=tp4gemv TP_TIMEOUT=260 four_gpu_tp_timing
}

# Two GPUs (ninth session): the TP 2 GPU tests with the batch-1 projection kernel on (in four_gpu_gemv_check
# they ran out of their 200 s), then the kernel's tests compiled on the card.
two_gpu_gemv_check() {
    ns
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_fused_allreduce_gpu.py 2>&1 | tail -3
    echo
    SHARDSERVE_KERNEL_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_linear.py \
        2>&1 | tail -3
}

# Four GPUs (prepared in the ninth session, not run yet): TP 1 / 4 batch 1 with the host's critical
# path per rank (driver turnaround, prep to replay: rank_timing), then TP 4 with the driver one
# step further ahead (async_depth 3) against the default 2, alternating.
four_gpu_tp_host() {
    TP_CASES=tp4gemv TP_TIMEOUT=260 four_gpu_tp_timing
    TP_CASES=tp4depth TP_TIMEOUT=320 four_gpu_tp_timing
}

# Four GPUs (prepared in the eighth session, not run yet): vLLM 0.24 batch-1 decode at TP 1 / 2 / 4,
# the peer beside four_gpu_tp_timing's figures (run that next, on the same warm machine). Needs
# the vLLM parts in /tmp/vp first (../shared/device/README.md: one call per part).
four_gpu_vllm_tp() {
    ns
    vllm_site
    for tp in 1 2 4; do
        PYTHONPATH=/tmp/vsite:/tmp/ns VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
            VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 timeout 180 python3 benchmarks/vllm_bench.py --out "$OUT" \
            --tp $tp --num-requests 0 > "$OUT/vllm_tp$tp.log" 2>&1
        tail -1 "$OUT/vllm_tp$tp.log"
    done
}

# Four GPUs: batch-1 decode at TP 1 / 2 / 4 (async, the default) and TP 1 / 2 synchronous, then
# Qwen3-30B-A3B offline at TP 2 and TP 2 + EP 2 on the 1,000-request workload (issue 4).
four_gpu_parallel() {
    ns
    timeout 570 python3 benchmarks/parallel_gpu.py --cases tp,tpsync,ep --num-requests 1000 --case-timeout-s 200 \
        --out "$OUT/parallel" 2>&1 | tee "$OUT/parallel_gpu.log" | tail -14
}

# Two GPUs: pipeline parallelism on the 1,000-request workload, PP 1 (512 running) vs PP 2 (1,024).
two_gpu_pp() {
    ns
    timeout 560 python3 benchmarks/parallel_gpu.py --cases "${PP_CASES:-ppwide}" --num-requests "${PP_REQUESTS:-1000}" --case-timeout-s 270 \
        --out "$OUT/parallel" 2>&1 | tee "$OUT/parallel_gpu.log" | tail -6
}

# Two GPUs: the whole serving stack vs the engine offline (issue 5).
two_gpu_serve() {
    ns
    ray_site
    timeout 580 python3 benchmarks/serve_gpu.py --out "$OUT/serve" --num-requests "${SERVE_REQUESTS:-256}" \
        --stream-interval-ms "${STREAM_INTERVAL_MS:-0}" --time-budget-s 560 2>&1 \
        | tee "$OUT/serve_gpu.log" | tail -25
}

"$@"
