"""Where a replica's cold start goes inside the engine: imports, weight load, executor, first token.

Why: a request that arrives at a deployment scaled to zero waits for Serve to start a replica, for
Ray to start its actor (the replica logs `process`: cluster/metrics/startup.py) and for the engine
to be built (`engine`), then for its own first token. This script splits the engine stage without
Ray, in a fresh process, with the production code: `import` of the engine modules (torch
included), `load_model` (config, tokenizer, weights read and converted), `make_executor` (model
runner: KV cache sized and allocated, warm-up / graph capture where the device has it), the rest
of `LLMEngine.__init__` (scheduler, KV manager), and the first request's time to first token.

Run (CPU, the embedded SmolLM2 as the `real` test app and `configs/cpu-default.yaml` serve it):
    python benchmarks/cold_start.py
    python benchmarks/cold_start.py --source dummy:llama-3.1-8b --device cuda --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import time

T0 = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--cpu-kv-cache-bytes", type=int, default=64 << 20)
    args = parser.parse_args()
    stages: dict[str, float] = {}
    mark = time.monotonic()

    def stage(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        stages[name] = now - mark
        mark = now

    from shardserve.cluster.config import ModelSection
    from shardserve.workers import engine as engine_module
    from shardserve.workers.models.loader import load_model, resolve_device, resolve_dtype
    from shardserve.workers.request import SamplingParams

    stage("import")
    section = ModelSection.model_validate({
        "name": "m", "source": args.source, "device": args.device, "dtype": args.dtype,
        "max_model_len": args.max_model_len, "cache": {"cpu_kv_cache_bytes": args.cpu_kv_cache_bytes},
    })  # fmt: skip
    config = section.to_engine_config()
    device = resolve_device(config.model.device)
    loaded = load_model(config.model, device, resolve_dtype(config.model.dtype, device))
    stage("load_model")
    real_make_executor = engine_module.make_executor
    executor_s: list[float] = []

    def timed_make_executor(*a, **kw):  # the engine's own call, timed
        start = time.monotonic()
        try:
            return real_make_executor(*a, **kw)
        finally:
            executor_s.append(time.monotonic() - start)

    engine_module.make_executor = timed_make_executor
    engine = engine_module.LLMEngine(config, loaded=loaded)
    stage("engine_init")
    stages["engine_init"] -= executor_s[0]
    stages["make_executor"] = executor_s[0]
    engine.add_request("cold", "Hello", SamplingParams(max_tokens=1))
    while not any(out.outputs[0].token_ids for out in engine.step()):
        pass
    stage("first_token")
    total = time.monotonic() - T0
    print(f"process start to first token: {total:.2f} s (device {device})")
    for name, seconds in stages.items():
        print(f"  {name:<14} {seconds:7.2f} s")
    engine.shutdown()


if __name__ == "__main__":
    main()
