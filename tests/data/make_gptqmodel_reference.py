"""Writes tests/data/gptqmodel_tiny/: a tiny random Llama quantized by GPTQModel itself, plus GPTQModel's
own dequantization of every quantized linear (reference_weights.safetensors), for
tests/models/test_gptqmodel_reference.py.

GPTQModel 7.7.0 declares torch>=2.14.1 and ~20 dependencies, so it is not in the dev extra (it would
replace the project's torch); it runs on CPU with the project's torch 2.13 when installed aside:
    .venv/bin/python -m pip install --no-deps --target /tmp/gptqmodel gptqmodel==7.7.0 device-smi logbar \
        tokenicer defuser pypcre threadpoolctl torchao
    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=/tmp/gptqmodel .venv/bin/python tests/data/make_gptqmodel_reference.py
Data flow: random Llama (vocab 256, hidden 128, MLP 256, 2 layers, GQA 4 / 2) saved as float with the
embedded SmolLM2 tokenizer (GPTQModel.load wants one) -> GPTQModel.quantize on 1,024 random token ids
(4-bit, groups of 32, asymmetric, act-order) -> GPTQModel.save -> loaded again by GPTQModel on CPU
(torch backend in float16, its most precise choice: it takes fp16 or bf16), whose `dequantize_weight()` of
each linear is stored as the reference. Tokenizer
files are dropped from the committed folder (the test feeds token ids).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
from safetensors.torch import save_file
from shardserve.cluster.commands.quantize import hf_folder
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parent / "gptqmodel_tiny"
KEEP = ("config.json", "quantize_config.json", "model.safetensors")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gptqmodel-ref-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], bos_token_id=0,
                         eos_token_id=1, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(work / "float")
    AutoTokenizer.from_pretrained(str(hf_folder("default"))).save_pretrained(work / "float")
    model = GPTQModel.load(str(work / "float"), QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False),
                           device="cpu")
    ids = torch.randint(2, 256, (4, 256), generator=torch.Generator().manual_seed(1))
    model.quantize([{"input_ids": row[None], "attention_mask": torch.ones(1, 256, dtype=torch.long)} for row in ids],
                   batch_size=1)
    model.save(str(work / "gptq"))
    loaded = GPTQModel.load(str(work / "gptq"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    reference = {}
    for name, module in loaded.model.named_modules():
        if hasattr(module, "dequantize_weight"):
            reference[name] = module.dequantize_weight().detach().float().contiguous()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(work / "gptq" / name, OUT / name)
    save_file(reference, str(OUT / "reference_weights.safetensors"))
    shutil.rmtree(work)
    print(f"wrote {OUT}: {len(reference)} linears")


if __name__ == "__main__":
    main()
