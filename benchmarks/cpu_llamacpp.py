"""Batch-1 CPU decode of the embedded SmolLM2 GGUF: ours (kept quantized) vs llama.cpp, side by side.

One process, the same .gguf file and the same thread count for both. Each repeat runs, in turn:
llama.cpp (llama-cpp-python, `pip install -e .[bench]`) decoding `--tokens` tokens greedily from a
short prompt; ours (`LLM("default", quantization="gguf")`: Q4_1 projections on the C++ kernels of
workers/quant/cpu_kernels, LM head as the engine keeps it); and, unless `--skip-kernels`, the
model's projections at their exact shapes (30 layers x q/k/v/o/gate/up/down + the 49152 x 576 LM
head) on our kernels (Q4_1 layers, Q8_0 head) vs fp32 F.linear: the per-token matmul time
projected from them. Repeats interleave so a busy machine slows every contender alike; the
best repeat of each is reported (tok/s counts prefill + decode of a ~10-token prompt).
`--compare-modules` adds ours with decode steps run module by module (`decode_stack.set_enabled(False)`:
the fused ops and kernels, but one Python call per op), `--compare-eager` ours before the fused CPU path (`set_fused_kernels(False)`: eager
torch ops, torch attention backend, float LM head), interleaved with the others.
Prints tok/s, the ratio ours / llama.cpp, CPU model and threads; `--json PATH` writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPT = "Write a short story about a lighthouse keeper."
# per decoder layer: (output features, input features) of q, k, v, o, gate, up, down
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_LAYERS, SMOLLM2_VOCAB = 30, 49152


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def llamacpp_run(llm, prompt_ids: list[int], tokens: int) -> float:
    llm.reset()
    start = time.perf_counter()
    for n, _ in enumerate(llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True), start=1):
        if n == tokens:
            break
    return tokens / (time.perf_counter() - start)


def ours_run(llm, prompt: str, tokens: int, fused: bool = True, stack: bool = True) -> float:
    from shardserve.workers.models.layers import set_fused_kernels
    from shardserve.workers.quant.cpu_kernels import decode_stack
    from shardserve.workers.request import SamplingParams

    set_fused_kernels(fused)
    decode_stack.set_enabled(stack)

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    elapsed = time.perf_counter() - start
    set_fused_kernels(True)
    decode_stack.set_enabled(True)
    assert len(out.outputs[0].token_ids) == tokens
    return tokens / elapsed


class KernelShapes:
    """The model's per-token matmuls with random weights: ours (Q4_1-like layers, Q8_0 head) vs fp32."""

    def __init__(self) -> None:
        from shardserve.workers.quant.cpu_kernels import PackedQ8, pack_q4
        from shardserve.workers.quant.weights import GroupedWeight

        gen = torch.Generator().manual_seed(0)
        self.layers = []
        for _ in range(SMOLLM2_LAYERS):
            for n, k in SMOLLM2_LAYER:
                w = GroupedWeight(q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                                  scales=torch.rand(n, k // 32, generator=gen) * 0.01,
                                  mins=-torch.rand(n, k // 32, generator=gen) * 0.1, group_size=32)
                self.layers.append((pack_q4(w), w.dequantize()))
        q = torch.randint(-127, 128, (SMOLLM2_VOCAB, 576), generator=gen, dtype=torch.int8)
        d = torch.rand(SMOLLM2_VOCAB, 576 // 32, generator=gen) * 0.01
        self.head_q8 = PackedQ8.from_blocks(q, d)
        self.head_fp32 = self.head_q8.dequantize_rows(torch.arange(SMOLLM2_VOCAB))
        self.x = {576: torch.randn(1, 576, generator=gen), 1536: torch.randn(1, 1536, generator=gen)}

    def ours_ms(self, int8_activations: bool) -> dict[str, float]:
        from shardserve.workers.quant.cpu_kernels import q4_linear, q8_linear

        start = time.perf_counter()
        for packed, _ in self.layers:
            q4_linear(self.x[packed.k], packed, int8_activations=int8_activations)
        mid = time.perf_counter()
        q8_linear(self.x[576], self.head_q8, int8_activations=int8_activations)
        end = time.perf_counter()
        return {"layers_ms": 1e3 * (mid - start), "head_ms": 1e3 * (end - mid)}

    def fp32_ms(self) -> dict[str, float]:
        start = time.perf_counter()
        for _, dense in self.layers:
            F.linear(self.x[dense.shape[1]], dense)
        mid = time.perf_counter()
        F.linear(self.x[576], self.head_fp32)
        end = time.perf_counter()
        return {"layers_ms": 1e3 * (mid - start), "head_ms": 1e3 * (end - mid)}


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda r: r["layers_ms"] + r["head_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-kernels", action="store_true", help="no per-shape kernel projection")
    ap.add_argument("--skip-engine", action="store_true", help="no end-to-end run of ours (kernels only)")
    ap.add_argument("--cpu-activations", choices=["float", "int8"], default="float",
                    help="ours: ModelConfig.cpu_activations (int8 = llama.cpp's activation rounding)")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also ours before the fused CPU path (eager torch ops, float LM head)")
    ap.add_argument("--compare-modules", action="store_true",
                    help="also ours with decode steps module by module (no one-call C++ decoder stack)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from llama_cpp import Llama  # the peer: pip install -e .[bench]
    from shardserve.workers.models.loader import default_model_path
    from shardserve.workers.quant.cpu_kernels import best_isa

    torch.set_num_threads(args.threads)
    gguf = default_model_path()
    peer = Llama(model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                 verbose=False)
    prompt_ids = peer.tokenize(PROMPT.encode())
    ours = None
    if not args.skip_engine:
        from shardserve.workers.llm import LLM

        ours = LLM("default", quantization="gguf", cpu_activations=args.cpu_activations)
        ours_run(ours, PROMPT, 4)  # warm-up: first-call allocations
    eager = None
    if args.compare_eager:
        from shardserve.workers.llm import LLM
        from shardserve.workers.models.layers import set_fused_kernels

        set_fused_kernels(False)  # loaded with the torch attention backend and the float LM head
        eager = LLM("default", quantization="gguf", cpu_activations=args.cpu_activations)
        set_fused_kernels(True)
        ours_run(eager, PROMPT, 4, fused=False)
    if args.compare_modules and ours is not None:
        ours_run(ours, PROMPT, 4, stack=False)
    shapes = None if args.skip_kernels else KernelShapes()
    llamacpp_run(peer, prompt_ids, 4)

    modules_tps: list[float] = []
    peer_tps, ours_tps, eager_tps, k_ours, k_int8, k_fp32 = [], [], [], [], [], []
    for r in range(args.repeats):
        peer_tps.append(llamacpp_run(peer, prompt_ids, args.tokens))
        if ours is not None:
            ours_tps.append(ours_run(ours, PROMPT, args.tokens))
        if args.compare_modules and ours is not None:
            modules_tps.append(ours_run(ours, PROMPT, args.tokens, stack=False))
        if eager is not None:
            eager_tps.append(ours_run(eager, PROMPT, args.tokens, fused=False))
        if shapes is not None:
            k_ours.append(shapes.ours_ms(int8_activations=False))
            k_int8.append(shapes.ours_ms(int8_activations=True))
            k_fp32.append(shapes.fp32_ms())
        print(f"repeat {r + 1}: llama.cpp {peer_tps[-1]:.1f} tok/s"
              + (f", ours {ours_tps[-1]:.1f} tok/s" if ours_tps else "")
              + (f", ours module by module {modules_tps[-1]:.1f} tok/s" if modules_tps else "")
              + (f", ours eager (before) {eager_tps[-1]:.1f} tok/s" if eager_tps else "")
              + (f", kernels ours {sum(k_ours[-1].values()):.2f} ms (int8 act {sum(k_int8[-1].values()):.2f})"
                 f" / fp32 {sum(k_fp32[-1].values()):.2f} ms" if k_ours else ""), flush=True)

    result: dict[str, object] = {
        "cpu": cpu_model(), "threads": args.threads, "isa": best_isa(), "gguf": gguf.name, "tokens": args.tokens,
        "repeats": args.repeats, "llamacpp_tok_s": max(peer_tps), "cpu_activations": args.cpu_activations,
    }
    print(f"\nCPU {result['cpu']}, {args.threads} threads, kernels {result['isa']}, {gguf.name}, "
          f"{args.tokens} new tokens, best of {args.repeats}")
    print(f"llama.cpp (llama-cpp-python): {max(peer_tps):.1f} tok/s")
    if ours_tps:
        result["ours_tok_s"] = max(ours_tps)
        result["ratio_ours_over_llamacpp"] = max(ours_tps) / max(peer_tps)
        print(f"ours, LLM('default', quantization='gguf', cpu_activations='{args.cpu_activations}'): "
              f"{max(ours_tps):.1f} tok/s "
              f"= {result['ratio_ours_over_llamacpp']:.2f}x llama.cpp")
    if modules_tps:
        result["ours_modules_tok_s"] = max(modules_tps)
        print(f"ours module by module (no C++ decoder stack): {max(modules_tps):.1f} tok/s "
              f"= {max(modules_tps) / max(peer_tps):.2f}x llama.cpp")
    if eager_tps:
        result["ours_eager_tok_s"] = max(eager_tps)
        print(f"ours before the fused CPU path (eager ops, float LM head): {max(eager_tps):.1f} tok/s "
              f"= {max(eager_tps) / max(peer_tps):.2f}x llama.cpp")
    if k_ours:
        f = best(k_fp32)
        result["kernels_fp32_ms"] = f
        print(f"matmuls per token at SmolLM2's shapes (30 layers + 49152 x 576 LM head): fp32 F.linear "
              f"{f['layers_ms']:.2f} ms layers + {f['head_ms']:.2f} ms head = {f['layers_ms'] + f['head_ms']:.2f} ms")
        for key, runs, label in (("float_act", k_ours, "ours, float activations (default)"),
                                 ("int8_act", k_int8, "ours, int8 activations (llama.cpp's way)")):
            o = best(runs)
            per_token = o["layers_ms"] + o["head_ms"]
            result[f"kernels_{key}_ms"] = o
            result[f"kernels_{key}_only_tok_s"] = 1e3 / per_token
            print(f"  {label}: {o['layers_ms']:.2f} ms layers (Q4_1) + {o['head_ms']:.2f} ms head (Q8_0) = "
                  f"{per_token:.2f} ms, {(f['layers_ms'] + f['head_ms']) / per_token:.1f}x fp32; matmuls alone "
                  f"would allow {1e3 / per_token:.0f} tok/s")
        print(f"  llama.cpp's whole token: {1e3 / max(peer_tps):.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
