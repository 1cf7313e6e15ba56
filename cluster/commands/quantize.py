"""`shardserve quantize`: writes a GPTQ / AWQ folder from a float model and a calibration text.

    shardserve quantize --model default --method gptq --bits 4 --group-size 128 \
        --calib benchmarks/data/calib.txt --eval benchmarks/data/eval.txt --out /tmp/smollm2-gptq

Data flow: the flags become a QuantSpec (refused with the field and allowed values, exit 2); the
model (a Hugging Face folder, or `default`: the embedded SmolLM2 GGUF through the loader's
float conversion cache, gguf_cache.py) is loaded with transformers' AutoModelForCausalLM on CPU
in float32; the first --calib-tokens tokens of --calib, in sequences of up to 512, calibrate
workers/quant/calibrate.py (one progress bar step per layer); workers/quant/checkpoint.py
writes the folder. Last, the perplexity of the float and of the quantized model on the eval
tokens (--eval, else the part of --calib after the calibration tokens) is printed, computed by
workers/eval/perplexity.py (the function behind `shardserve eval perplexity`) on the
transformers model, which holds exactly the weights the folder does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEQ_LEN = 512  # calibration sequence, tokens
WINDOW, STRIDE = 512, 256  # perplexity windows, as `shardserve eval perplexity` defaults
MIN_EVAL_TOKENS = 128
# Default calibration tokens: GPTQ's Hessians gain from 7168 (vs 2048); AWQ with RTN measured no better with more.
CALIB_TOKENS = {"gptq": 7168, "other": 2048}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="write a GPTQ / AWQ quantized folder from a float model")
    p.add_argument("--model", default="default", help="Hugging Face folder, file.gguf, or default (SmolLM2)")
    p.add_argument("--method", required=True, choices=("rtn", "gptq", "awq"))
    p.add_argument("--bits", type=int, default=4, help="4 (rtn, gptq, awq) or 8 (rtn, gptq)")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 (one group per row)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=False, help="symmetric grid")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="zero point per group (default: measured better for every method)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order: columns by decreasing diag(H) (default on with GPTQ rounding; its g_idx is "
                        "refused by row-parallel layers under TP > 1: add --static-groups there)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: every group's grid fixed before the error feedback (with --desc-act: no g_idx; "
                        "default on for awq's GPTQ rounding)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ: fraction of mean(diag H) added to its diagonal, in (0, 1) (default 0.01)")
    p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: asymmetric calibration (GPTAQ), each linear's target the float model's "
                        "output (default on for gptq)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="each group's scale re-solved by least squares on the output error once its codes are "
                        "fixed (workers/quant/algorithms/refit.py; RTN rounding: needs the clipping search; default on for awq only)")
    p.add_argument("--gains", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ rounding: one least-squares gain per input channel of q/k/v, gate/up and down once "
                        "each is quantized, folded into the norms and up_proj's scales (algorithms/gains.py; default on for awq only)")
    p.add_argument("--awq-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: AWQ's per-input scales searched and folded into the norms before GPTQ (default on "
                        "for gptq: 14.296 vs 14.500 without, benchmarks/README.md)")
    p.add_argument("--rounding", choices=("rtn", "gptq"), default=None,
                   help="AWQ: how the scaled weights are rounded: rtn (AutoAWQ's clip + round to nearest) or "
                        "gptq (default: GPTQ's error feedback, act-order with static groups: the AWQ layout has no g_idx)")
    p.add_argument("--no-clip", dest="clip", action="store_false",
                   help="min-max group grids (default: searched clipping, workers/quant/algorithms/clip.py)")
    p.add_argument("--calib", required=True, type=Path, help="calibration text file (UTF-8)")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help=f"calibration tokens: below {SEQ_LEN} or a multiple of {SEQ_LEN} (default: "
                        f"{CALIB_TOKENS['gptq']} with GPTQ rounding (gptq, awq), {CALIB_TOKENS['other']} for rtn / awq --rounding rtn)")
    p.add_argument("--eval", type=Path, default=None,
                   help="text for the perplexity check (default: --calib after the calibration tokens)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="print the quality summary as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shardserve.workers.quant.calibrate import QuantSpec

    try:
        resolve_defaults(args)
        spec = QuantSpec(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                         desc_act=args.desc_act, clip=args.clip, static_groups=args.static_groups,
                         damp=args.damp, gptaq=args.gptaq, awq_scales=args.awq_scales, rounding=args.rounding,
                         refit=args.refit, gains=args.gains)
        check_tokens(args.calib_tokens)
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise ValueError(f"--out {args.out} exists and is not an empty folder")
        for flag, path in (("--calib", args.calib), ("--eval", args.eval)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path} is not a file")
        folder = hf_folder(args.model)
    except (ValueError, OSError) as exc:
        print(f"shardserve quantize: {exc}", file=sys.stderr)
        return 2
    return quantize(args, spec, folder)


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fills the flags left unset with the best measured setting (benchmarks/README.md's quality row):
    gptq: AWQ's scales folded in, then act-order + GPTAQ on 7168 tokens; awq: AWQ's scales rounded by GPTQ (act-order with static
    groups, the AWQ layout has no g_idx) + GPTAQ + scale refit + channel gains on 7168 tokens; rtn and
    awq --rounding rtn: 2048 tokens. A flag given explicitly is kept (QuantSpec refuses contradictions)."""
    if args.rounding is None:
        args.rounding = "gptq" if args.method == "awq" else ""
    gptq_rounding = args.method == "gptq" or args.rounding == "gptq"
    awq_gptq = args.method == "awq" and args.rounding == "gptq"
    if args.desc_act is None:
        args.desc_act = gptq_rounding
    if args.static_groups is None:
        args.static_groups = awq_gptq and args.desc_act
    if args.gptaq is None:
        args.gptaq = gptq_rounding
    if args.awq_scales is None:
        args.awq_scales = args.method == "gptq"
    if args.refit is None:
        args.refit = awq_gptq
    if args.gains is None:
        args.gains = awq_gptq
    if args.calib_tokens is None:
        args.calib_tokens = CALIB_TOKENS["gptq" if gptq_rounding else "other"]


def check_tokens(calib_tokens: int) -> None:
    if calib_tokens < 16 or (calib_tokens > SEQ_LEN and calib_tokens % SEQ_LEN):
        raise ValueError(f"--calib-tokens must be 16..{SEQ_LEN} or a multiple of {SEQ_LEN}, got {calib_tokens}")


def quantize(args: argparse.Namespace, spec: Any, folder: Path) -> int:
    import torch
    from shardserve.workers.quant.calibrate import quantize_model
    from shardserve.workers.quant.checkpoint import write_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    calib = tokenizer(args.calib.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(calib) < args.calib_tokens:
        print(f"shardserve quantize: --calib {args.calib} has {len(calib)} tokens, fewer than "
              f"--calib-tokens {args.calib_tokens}", file=sys.stderr)
        return 2
    if args.eval is not None:
        held_out = tokenizer(args.eval.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    else:
        held_out = calib[args.calib_tokens:]
    if len(held_out) < MIN_EVAL_TOKENS:
        print(f"shardserve quantize: only {len(held_out)} tokens to evaluate on (need {MIN_EVAL_TOKENS}): "
              "pass --eval FILE or a longer --calib", file=sys.stderr)
        return 2
    seq_len = min(SEQ_LEN, args.calib_tokens)
    calib_ids = torch.tensor(calib[:args.calib_tokens]).reshape(-1, seq_len)  # [num_seqs, seq_len]

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    started = time.perf_counter()
    float_ppl = perplexity(model, held_out)
    result = quantize_model(model, calib_ids, spec, progress=True)
    out = write_folder(args.out, folder, model, result, spec)
    quant_ppl = perplexity(model, held_out)
    summary = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
               "desc_act": spec.desc_act, "clip": spec.clip, "clip_error": spec.clip_error,
               "static_groups": spec.static_groups, "gptaq": spec.gptaq, "gptaq_alpha": spec.gptaq_alpha,
               "damp": spec.damp, "refit": spec.refit, "gains": spec.gains, "awq_scales": spec.awq_scales,
               "rounding": spec.rounding, "calib_tokens": args.calib_tokens, "eval_tokens": len(held_out),
               "float_perplexity": round(float_ppl, 4), "quantized_perplexity": round(quant_ppl, 4),
               "increase_pct": round(100 * (quant_ppl / float_ppl - 1), 2), "out": str(out),
               "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out} ({spec.format} layout, {len(result.packed)} quantized linears)")
        print(f"perplexity on {summary['eval_tokens']} held-out tokens: float {float_ppl:.3f}, "
              f"{spec.method} int{spec.bits} g{spec.group_size} {quant_ppl:.3f} "
              f"({summary['increase_pct']:+.2f} %)")
    return 0


def hf_folder(model: str) -> Path:
    """A Hugging Face folder for `model`: itself, or the loader's float conversion of a GGUF file."""
    from shardserve.workers.models.loader import default_model_path, gguf_float_folder

    path = default_model_path() if model == "default" else Path(model).expanduser()
    if path.suffix != ".gguf":
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: not a folder with config.json, a .gguf file or 'default'")
        return path
    return gguf_float_folder(path)


class HFScorer:
    """A transformers causal LM as workers/eval/perplexity.py's `Scorer`, so the quality printed here
    is computed by the same windows and sums as `shardserve eval perplexity`."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(self, prompt: Sequence[int], num_targets: int | None = None) -> Any:
        """log-probs [num_targets, vocab] of the last num_targets tokens of prompt, float32."""
        import torch

        num_targets = len(prompt) - 1 if num_targets is None else num_targets
        ids = torch.tensor([list(prompt)])  # [1, T]
        logits = self.model(input_ids=ids, use_cache=False).logits[0]  # [T, vocab]
        return torch.log_softmax(logits[-num_targets - 1:-1].float(), dim=-1)


def perplexity(model: Any, ids: Sequence[int]) -> float:
    """Perplexity of a transformers model on ids: sliding windows of 512 tokens, stride 256."""
    from shardserve.workers.eval.perplexity import evaluate_perplexity
    from shardserve.workers.quant.algorithms.gptq import one_thread

    with one_thread():
        return evaluate_perplexity(HFScorer(model), ids, window=WINDOW, stride=STRIDE).perplexity
