"""CPU time per decoded token, one thread: llama.cpp vs ours (float / int8 activations / before).

The wall-clock benchmark (cpu_llamacpp.py) is noise-dominated on a shared 2-core machine: a
descheduled OpenMP thread stalls every parallel region, and llama.cpp's spinning threads suffer
most. Here each contender runs single-threaded and is charged its process CPU time
(`time.process_time`), which other tenants' load barely moves. Contenders, interleaved, best of
`--repeats`: llama-cpp-python on the same GGUF; ours `LLM("default", quantization="gguf")` with
`cpu_activations` float and int8 (decode steps in one C++ call: decode_stack.py); ours float module by
module (`decode_stack.set_enabled(False)`); and ours before the fused CPU path (`set_fused_kernels(False)`:
eager torch ops, torch attention, float LM head). Each decodes `--tokens` tokens greedily from a
short prompt (prefill included). Prints ms of CPU per token and the ratio to llama.cpp.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPT = "Write a short story about a lighthouse keeper."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from llama_cpp import Llama  # the peer: pip install -e .[bench]
    from shardserve.workers.llm import LLM
    from shardserve.workers.models.layers import set_fused_kernels
    from shardserve.workers.models.loader import default_model_path
    from shardserve.workers.quant.cpu_kernels import decode_stack
    from shardserve.workers.request import SamplingParams

    torch.set_num_threads(1)
    peer = Llama(model_path=str(default_model_path()), n_threads=1, n_threads_batch=1, n_ctx=512, verbose=False)
    ids = peer.tokenize(PROMPT.encode())
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    def peer_run() -> None:
        peer.reset()
        for n, _ in enumerate(peer.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if n == args.tokens:
                break

    def ours(llm: LLM, fused: bool = True, stack: bool = True) -> None:
        set_fused_kernels(fused)
        decode_stack.set_enabled(stack)
        try:
            llm.generate([PROMPT], params)
        finally:
            set_fused_kernels(True)
            decode_stack.set_enabled(True)

    fast = LLM("default", quantization="gguf", cpu_activations="float")  # the default, auto, would be int8
    int8 = LLM("default", quantization="gguf", cpu_activations="int8")
    set_fused_kernels(False)  # loaded with the torch attention backend and the float LM head
    eager = LLM("default", quantization="gguf", cpu_activations="float")
    set_fused_kernels(True)
    runs = {"llama.cpp": peer_run, "ours, float activations": lambda: ours(fast),
            "ours, int8 activations": lambda: ours(int8),
            "ours, float, module by module": lambda: ours(fast, stack=False), "ours before the fused CPU path": lambda: ours(eager, False)}
    for run in runs.values():
        run()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], (time.process_time() - start) / args.tokens * 1e3)
    for name, ms in best.items():
        print(f"{name}: {ms:.2f} ms CPU per token, 1 thread ({1e3 / ms:.1f} tok/s of CPU time); "
              f"{best['llama.cpp'] / ms:.2f}x llama.cpp")


if __name__ == "__main__":
    main()
