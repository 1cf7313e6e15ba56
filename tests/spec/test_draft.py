"""The draft-model proposer in the real engine (embedded SmolLM2 on CPU): lossless, batched, refused.

Greedy outputs with a draft model must equal the plain engine's token for token. The draft is
SmolLM2 itself (every draft must then be accepted: the test reads it from the spec metrics) with
a KV pool small enough to preempt and the prompts twice (prefix-cache hits, in the target and in
the draft's own engine); and SmolLM2 cut to 24 of its 30 layers (self-speculation), with the
`bench latency --draft-*` flags' mapping, sharing the target's tensors; and at tensor parallel 3,
where the draft loads its own copy. Each bad setting is refused at start-up with its reason: another
vocabulary, a KV pool that does not fit, a layer count out of range, draft fields without method
`draft`, method `draft` without a draft model.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from shardserve.workers.bench.spec_tasks import TASKS
from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.llm import LLM
from shardserve.workers.request import SamplingParams
from shardserve.workers.spec.draft import DraftModelProposer
from shardserve.workers.spec.proposer import TargetModel
from shardserve.workers.spec.self_draft import parameter_bytes, shares_target_weights

MAX_TOKENS = 16
SELF_DRAFT = {"method": "draft", "draft_model": "default", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM("default")


@pytest.fixture(scope="module")
def prompts(plain: LLM) -> list[str]:
    template = plain.tokenizer.apply_chat_template
    return [template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            for text in TASKS.values()]


@pytest.fixture(scope="module")
def want(plain: LLM, prompts: list[str]) -> list[tuple[int, ...]]:
    outs = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outs]


def test_target_as_its_own_draft_accepts_everything_under_preemption_and_prefix_hits(prompts, want) -> None:
    """Draft = the target's weights: greedy drafts are the target's own tokens, so ~every one is
    accepted — with a KV pool too small for all requests (preemption by recompute, in the target
    and in the draft's engine, which gets as many blocks) and prefix hits — and the drafts of a
    step's requests run as one batch in the draft's engine, whose prefix cache makes calls incremental."""
    llm = LLM("default", speculative=SELF_DRAFT, num_blocks=24, block_size=16)
    proposer = llm.engine.speculator.proposer
    assert isinstance(proposer, DraftModelProposer)
    batch_sizes: list[int] = []
    propose_batch = proposer.propose_batch

    def spy(queries):
        batch_sizes.append(len(queries))
        return propose_batch(queries)

    proposer.propose_batch = spy
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts + prompts,
                                                              SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]
        assert got == want + want
        stats = llm.engine.stats()
        assert stats.num_preemptions > 0, "the pool was meant to force preemption"
        assert stats.prefix_cache_hit_rate > 0
        spec = stats.spec_decode
        assert spec.num_draft_tokens > 30 and spec.acceptance_rate >= 0.95, spec
        assert spec.mean_accepted_length > 2.5, spec
        assert max(batch_sizes) > 1, batch_sizes  # several requests' drafts in one call
        assert proposer.engine.stats().prefix_cache_hit_rate > 0.5  # the draft's calls are incremental
    finally:
        llm.engine.shutdown()


def test_layer_truncated_self_draft_shares_the_targets_weights_and_is_lossless(prompts, want) -> None:
    """Self-speculation: SmolLM2 cut to its first 24 of 30 layers drafts for SmolLM2; the draft's
    parameters are the target's own tensors (no second copy: the draft holds 0 bytes of its own), the
    target keeps its 30 layers, the outputs equal the plain engine's, drafts were proposed and some
    accepted. The `bench latency --draft-*` flags map onto the same SpeculativeConfig fields (the
    bench itself is tested with ngram)."""
    from shardserve.cluster.cli import build_parser
    from shardserve.workers.bench.spec_runs import speculative_config

    args = build_parser().parse_args(["bench", "latency", "--speculative-method", "draft", "--draft-model", "default",
                                      "--draft-num-layers", "24", "--num-speculative-tokens", "3"])
    config = speculative_config(args)
    assert (config.speculative_method, config.draft_model, config.draft_num_layers,
            config.num_speculative_tokens) == ("draft", "default", 24, 3)
    llm = LLM("default", speculative={"method": "draft", "draft_model": "default", "draft_num_layers": 24,
                                      "num_speculative_tokens": 3})
    try:
        proposer = llm.engine.speculator.proposer
        draft, target = proposer.engine.loaded.model, llm.engine.loaded.model
        assert proposer.shares_target_weights
        assert len(draft.model.layers) == 24 and len(target.model.layers) == 30
        assert all(mine is theirs for mine, theirs in zip(draft.model.layers, target.model.layers[:24], strict=True))
        target_ptrs = {t.data_ptr() for t in target.parameters()}
        assert all(t.data_ptr() in target_ptrs for t in draft.parameters())
        assert draft.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
        assert draft.cpu_lm_head is target.cpu_lm_head  # the packed CPU LM head too (None where unused)
        saved = parameter_bytes(draft)  # what a loaded copy of the truncated draft holds
        assert parameter_bytes(draft, exclude=target) == 0 and saved > 300 << 20, saved
        print(f"\nself-draft (24 of 30 layers) shares {saved / 2**20:.0f} MiB of the target's parameters")
        got = llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        assert [o.outputs[0].token_ids for o in got] == want[:2]
        spec = llm.engine.stats().spec_decode
        assert spec.num_draft_tokens >= spec.num_accepted_tokens > 0, spec
    finally:
        llm.engine.shutdown()


def test_smollm2_at_tp3_with_a_layer_truncated_self_draft_equals_plain(prompts, want) -> None:
    """The target at tensor parallel 3 (gloo, three rank processes; SmolLM2's 9 heads and 3 KV heads
    do not split in two), the draft at TP 1 in the driver, which holds no target weights: the vocabulary
    check reads the target's header, the draft loads its own 20 layers; outputs equal the plain engine's."""
    llm = LLM("default", tensor_parallel_size=3, speculative={"method": "draft", "draft_model": "default",
                                                              "draft_num_layers": 20, "num_speculative_tokens": 3})
    try:
        proposer = llm.engine.speculator.proposer
        assert llm.engine.loaded.model is None and not proposer.shares_target_weights
        assert len(proposer.engine.loaded.model.model.layers) == 20
        got = llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        assert [o.outputs[0].token_ids for o in got] == want[:2]
        assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    finally:
        llm.engine.shutdown()


def _start(plain: LLM, **options) -> DraftModelProposer:
    """The draft's start-up against the (already loaded) plain target, as the engine runs it."""
    engine = plain.engine
    config = SpeculativeConfig(speculative_method="draft", **options)
    return DraftModelProposer(config, TargetModel(engine.config, engine.loaded, engine.num_blocks, type(engine)))


def test_only_a_draft_loading_the_targets_own_weights_shares_them(plain) -> None:
    """Sharing needs the same source (`default` and the GGUF's own path are one) and quantization,
    and the target's model in this process; a quantized draft of an unquantized target loads its own."""
    from shardserve.workers.config import ModelConfig
    from shardserve.workers.models.loader import default_model_path

    target, loaded = plain.engine.config.model, plain.engine.loaded
    for spec in ("default", str(default_model_path())):
        assert shares_target_weights(ModelConfig(model=spec), target, loaded)
    assert not shares_target_weights(ModelConfig(model="default", quantization="int8"), target, loaded)
    assert not shares_target_weights(ModelConfig(model="dummy:tiny-llama"), target, loaded)
    assert not shares_target_weights(ModelConfig(model="default"), target, replace(loaded, model=None))  # TP > 1


@pytest.mark.parametrize(("options", "message"), [
    ({"draft_model": "dummy:tiny-llama"}, "has a vocabulary of 256 tokens, the target 'SmolLM2-135M-Instruct' one of "
                                          "49152: a draft must share the target's tokenizer"),
    ({"draft_model": "default", "draft_num_layers": 31},
     "draft_num_layers must be in [1, 30] (the draft model's num_hidden_layers), got 31"),
    ({"draft_model": "default", "draft_num_blocks": 10**8}, "the draft model does not fit: its KV pool of "
                                                            "100000000 blocks needs"),
])
def test_bad_drafts_are_refused_at_start_up(plain, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _start(plain, **options)
    assert message in str(info.value)


def test_engine_start_up_refuses_a_draft_with_another_vocabulary() -> None:
    with pytest.raises(ValueError, match="a draft must share the target's tokenizer"):
        LLM("default", speculative={"method": "draft", "draft_model": "dummy:tiny-llama"})


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "draft"}, "speculative method `draft` requires draft_model"),
    ({"method": "ngram", "draft_model": "default"}, "draft_model is only used with speculative method `draft`, "
                                                    "got method 'ngram'"),
    ({"draft_num_layers": 4}, "draft_num_layers is only used with speculative method `draft`, got method None"),
    ({"method": "draft", "draft_model": "default", "draft_num_layers": 0}, "draft_num_layers must be >= 1, got 0"),
    ({"method": "draft", "draft_model": "default", "draft_num_blocks": 1}, "draft_num_blocks must be >= 2, got 1"),
    ({"method": "draft", "draft_model": "default", "draft_quantization": "int3"},
     "draft_quantization must be null or one of int8"),
])
def test_bad_draft_settings_are_refused_with_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        LLM("default", speculative=options)
    assert message in str(info.value)


def test_yaml_draft_section_reaches_the_engine() -> None:
    from shardserve.cluster.config import ConfigError, ServeConfig, parse_config

    draft = {"method": "draft", "draft_model": "default", "draft_num_layers": 20, "draft_quantization": "int8",
             "draft_num_blocks": 64}
    section = {"name": "m", "source": "default", "speculative": draft}
    spec = ServeConfig.model_validate({"models": [section]}).models[0].to_engine_config().speculative
    assert (spec.speculative_method, spec.draft_model, spec.draft_num_layers, spec.draft_quantization,
            spec.draft_num_blocks) == ("draft", "default", 20, "int8", 64)
    with pytest.raises(ConfigError, match="draft_model"):
        parse_config({"models": [section | {"speculative": {"method": "ngram", "draft_model": "default"}}]})
