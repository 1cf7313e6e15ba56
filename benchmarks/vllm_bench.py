"""vLLM 0.24 on the same shapes and workloads as benchmarks/gpu_bench.py, for side-by-side figures.

Data flow: the Llama-3.1-8B-shaped config of `dummy:llama-3.1-8b` is written to a folder as
`config.json` (the same transformers config our engine builds); vLLM loads it with
`load_format="dummy"` and `skip_tokenizer_init=True` (bf16, its defaults otherwise: CUDA
graphs, torch.compile, prefix caching, chunked prefill). Prompts are token ids
(`TokensPrompt`) drawn by our own `Workload`, so both engines see identical requests:
batch-1 decode (16-token prompt, 256 new tokens, ignore_eos; decode tok/s from the run's
wall time minus one prefill-only call) and the offline workload (1,000 lognormal requests,
medians 200 / 180, sigma 0.8, each generating exactly its output length). Prints start-up
time, both figures, the scheduler limits vLLM chose (max_num_seqs, max_num_batched_tokens:
ours are set to match in the same call) and the device; writes JSON to $OUT. Run it in a vLLM
environment (benchmarks/README.md, "Running"), on the same machine and in the same session
as gpu_bench.py (dense) or parallel_gpu.py (`--shape qwen3-30b-a3b --tp 2 [--ep]`: the MoE
figures of issue 4, expert parallelism through vLLM's `enable_expert_parallel`).
`--quantization awq|fp8` runs the quantized peers of benchmarks/quant_gpu.py (issue 22).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from shardserve.workers.bench.workload import Workload
from shardserve.workers.models.dummy import dummy_config


class _Limits:
    max_num_seqs: object = "?"
    max_num_batched_tokens: object = "?"


def _scheduler_limits(llm):
    """vLLM's scheduler config (its max_num_seqs / max_num_batched_tokens defaults depend on the GPU)."""
    try:
        return llm.llm_engine.vllm_config.scheduler_config
    except AttributeError:  # another vLLM layout: report unknown rather than lose the run
        return _Limits()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--num-requests", type=int, default=1000, help="offline workload size (0: batch 1 only)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--ep", action="store_true", help="enable_expert_parallel (MoE shapes)")
    parser.add_argument("--quantization", default="none", choices=["none", "awq", "fp8"],
                        help="awq: INT4 g128 AWQ (quantization_config in the dummy folder, fp16, Marlin on Hopper); "
                             "fp8: vLLM's online FP8 W8A8")
    parser.add_argument("--batch-sizes", default="1", help="decode batch sizes measured like batch 1, e.g. 1,64")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    from vllm import LLM, SamplingParams  # noqa: PLC0415 (only on the device)
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    folder = tempfile.mkdtemp(prefix="vllm-config-")
    config = dummy_config(args.shape)
    dtype, quantization = "bfloat16", None
    if args.quantization == "awq":
        config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm"}
        dtype = "float16"
    elif args.quantization == "fp8":
        quantization = "fp8"
    config.save_pretrained(folder)
    start = time.perf_counter()
    llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, seed=0,
              tensor_parallel_size=args.tp, enable_expert_parallel=args.ep, quantization=quantization)
    startup_s = time.perf_counter() - start
    sched = _scheduler_limits(llm)
    vocab_size = config.vocab_size

    def run(requests) -> tuple[float, int]:
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True,
                                 detokenize=False) for r in requests]
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    run(Workload(4, 16, 8, seed=99).sample(vocab_size))  # warm-up
    decode = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        reqs = Workload(batch, 16, 256, seed=1 if batch == 1 else batch).sample(vocab_size)
        prefill_only = [type(r)(r.prompt_token_ids, 1) for r in reqs]
        prefill_s = min(run(prefill_only)[0] for _ in range(3))
        total_s, tokens = run(reqs)
        decode[batch] = (tokens - batch) / (total_s - prefill_s)
    decode_tps = decode.get(1, float("nan"))
    try:
        linear_method = str(llm.llm_engine.vllm_config.model_config.quantization)
    except AttributeError:
        linear_method = "?"
    seconds, out_tokens = float("nan"), 0
    if args.num_requests > 0:
        workload = Workload(args.num_requests, 200, 180, "lognormal", 0.8,
                            max_len=config.max_position_embeddings // 2, seed=0)
        seconds, out_tokens = run(workload.sample(vocab_size))
    result = {"device": f"{torch.cuda.get_device_name()} x {args.tp}", "shape": args.shape, "tp": args.tp, "ep": args.ep,
              "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
              "startup_s": startup_s, "decode_b1_tokens_per_s": decode_tps, "quantization": args.quantization,
              "vllm_quantization": linear_method, "decode_tokens_per_s": decode, "throughput_output_tokens_per_s": out_tokens / seconds,
              "throughput_requests_per_s": args.num_requests / seconds, "throughput_elapsed_s": seconds}
    os.makedirs(args.out, exist_ok=True)
    name = "vllm_bench.json" if args.shape == "llama-3.1-8b" and args.tp == 1 and args.quantization == "none" else \
        f"vllm_bench-{args.shape}-tp{args.tp}{'-ep' if args.ep else ''}-{args.quantization}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2)
    print(f"vLLM {args.shape} quantization={args.quantization} (vLLM reports {linear_method}); decode tok/s by batch "
          f"{ {b: round(v, 1) for b, v in decode.items()} }")
    print(f"vLLM {args.shape} tp={args.tp} ep={args.ep} on {result['device']} (max_num_seqs {sched.max_num_seqs}, "
          f"max_num_batched_tokens {sched.max_num_batched_tokens}): start-up {startup_s:.0f} s; batch-1 decode {decode_tps:.1f} tok/s; "
          f"offline {args.num_requests} requests {result['throughput_output_tokens_per_s']:.0f} output tok/s "
          f"({result['throughput_requests_per_s']:.1f} req/s)")


if __name__ == "__main__":
    main()
