"""L2 prefetch kernel: it must read every byte it is given (per-program xor folds vs torch), write
nothing in a real launch, and compile to 16-byte evict_last loads with every store predicated off."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from compiled_ptx import compile_ptx, memory_ops
from shardserve.workers.kernels import l2_prefetch as lp
from shardserve.workers.kernels import reference


def random_tensor(numel: int, dtype: torch.dtype, device: torch.device, shape: tuple[int, ...] | None = None
                  ) -> torch.Tensor:
    """Random bits of `numel` elements: every byte may be anything, so a skipped word shows in the fold."""
    nbytes = numel * dtype.itemsize
    words = torch.randint(-2**31, 2**31 - 1, ((nbytes + 3) // 4,), dtype=torch.int32)
    t = words.view(torch.uint8)[:nbytes].clone().view(dtype)
    return t.reshape(shape if shape is not None else (numel,)).to(device)


def torch_folds(t: torch.Tensor, max_bytes: int | None, num_programs: int) -> list[int]:
    """Program p's xor of its int32 words (`plan`'s split), the last one also xoring the tail bytes."""
    nbytes = t.numel() * t.element_size() if max_bytes is None else min(t.numel() * t.element_size(), max_bytes)
    programs, chunk, n_words, n_tail = lp.plan(nbytes, num_programs)
    # plan must cover exactly the bytes asked for, every program having work (but with nothing to read)
    assert 4 * n_words + n_tail == nbytes and n_tail < lp.TAIL_BYTES and chunk % 16 == 0
    assert programs * chunk >= n_words and (n_words == 0 or (programs - 1) * chunk < n_words)
    raw = t.detach().cpu().reshape(-1).view(torch.uint8)[:nbytes].numpy()
    words = raw[: 4 * n_words].view(np.int32)
    folds = [int(np.bitwise_xor.reduce(words[p * chunk:(p + 1) * chunk], initial=np.int32(0)))
             for p in range(programs)]
    folds[-1] ^= int(np.bitwise_xor.reduce(raw[4 * n_words:].astype(np.int32), initial=np.int32(0)))
    return folds


CASES = [  # (numel, dtype, shape, max_bytes, num_programs)
    (1, torch.int8, None, None, 32),  # one byte: tail only
    (3, torch.int8, None, None, 32),  # not a multiple of the word size
    (63, torch.int8, None, None, 32),  # the largest tail-only size
    (64, torch.int8, None, None, 32),  # one 64-byte piece, no tail
    (65, torch.int8, None, None, 32),
    (1000, torch.bfloat16, None, None, 3),  # 2,000 bytes: 31 pieces, a 16-byte tail
    (7 * 33, torch.bfloat16, (7, 33), None, 32),  # 2-D, odd element count
    (70000, torch.float32, None, None, 32),  # 9 programs, chunks shorter than a block
    (20000, torch.float32, None, None, 2),  # chunks of 2 blocks: the loop runs twice
    (4097, torch.float32, (17, 241), None, 1),  # one program reads it all
    (64 * 100, torch.bfloat16, (64, 100), 1000, 32),  # capped, the cap not a multiple of 64
    (64 * 100, torch.bfloat16, (64, 100), 4096, 2),
    (64 * 100, torch.bfloat16, (64, 100), 10**9, 32),  # a cap above the size: the whole tensor
    (100, torch.float32, None, 0, 32),  # capped to nothing
    (0, torch.bfloat16, None, None, 32),  # empty
]


@pytest.mark.parametrize(("numel", "dtype", "shape", "max_bytes", "num_programs"), CASES)
def test_every_program_reads_every_word_of_its_chunk(device, numel, dtype, shape, max_bytes, num_programs):
    t = random_tensor(numel, dtype, device, shape)
    folds = lp.prefetch_folds(t, max_bytes, num_programs)
    assert folds.tolist() == torch_folds(t, max_bytes, num_programs)


def test_a_changed_word_changes_its_programs_fold(device):
    # the check above is only as strong as the fold: one flipped bit must show, in its program only
    t = random_tensor(40000, torch.float32, device)  # 5 blocks of work: 4 programs
    before = lp.prefetch_folds(t, None, 4)
    _, chunk, _, _ = lp.plan(t.numel() * 4, 4)
    t.view(torch.int32)[2 * chunk + 5] ^= 1 << 7
    after = lp.prefetch_folds(t, None, 4)
    assert (before != after).tolist() == [False, False, True, False]


def test_plan_covers_every_byte_once():
    for nbytes in list(range(0, 3000, 7)) + [2**25, 2**25 + 3, 123456789]:
        for num_programs in (1, 3, 16, 32, 1024):
            programs, chunk, n_words, n_tail = lp.plan(nbytes, num_programs)
            assert 1 <= programs <= num_programs and chunk % 16 == 0 and n_words % 16 == 0
            assert 4 * n_words + n_tail == nbytes and 0 <= n_tail < lp.TAIL_BYTES
            assert programs * chunk >= n_words and (n_words == 0 or (programs - 1) * chunk < n_words)
    assert lp.plan(4096 * 4096 * 2, 32) == (32, 262144, 4096 * 4096 // 2, 0)  # o_proj of Llama-8B, bf16


def test_real_launch_writes_nothing(device):
    t = random_tensor(5000, torch.bfloat16, device)
    sink = lp.sink_for(t.device)
    assert lp.prefetch_to_l2(t) is None
    assert lp.prefetch_to_l2(t, max_bytes=100, num_programs=4) is None
    assert not sink.any()  # the fold store is masked off at write_fold == 0
    assert lp.sink_for(t.device) is sink  # one per device


@pytest.mark.parametrize("prefetch", [lp.prefetch_to_l2, lp.prefetch_folds, reference.prefetch_to_l2])
def test_rejects_bad_arguments(device, prefetch):
    t = torch.zeros(8, 16, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        prefetch(t.t())
    with pytest.raises(ValueError, match="contiguous"):
        prefetch(t[:, ::2])
    with pytest.raises(ValueError, match="max_bytes"):
        prefetch(t, max_bytes=-1)
    for bad in (0, lp.MAX_PROGRAMS + 1):
        with pytest.raises(ValueError, match="num_programs"):
            prefetch(t, num_programs=bad)
    with pytest.raises(TypeError):
        prefetch(t.tolist())


def test_reference_is_a_no_op(device):
    t = torch.randn(4, 4, device=device)
    before = t.clone()
    assert reference.prefetch_to_l2(t, max_bytes=8, num_programs=2) is None
    assert torch.equal(t, before)


def _definition_chain(ptx: str, register: str) -> list[str]:
    """The instructions (opcode and operands) that compute `register`, followed back to parameter
    loads and special registers."""
    defs: dict[str, str] = {}
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*\s+(%\w+),\s*.*);", line)
        if m:
            defs[m.group(2)] = re.sub(r"\s+", " ", m.group(1))
    chain, todo, seen = [], [register], set()
    while todo:
        reg = todo.pop()
        if reg in seen or reg not in defs:
            continue
        seen.add(reg)
        chain.append(defs[reg])
        todo.extend(re.findall(r"%\w+", defs[reg].split(" ", 1)[1])[1:])  # the sources
    return chain


def test_compiles_to_16_byte_evict_last_loads_and_no_unconditional_store():
    # As launched on a 32 MB bf16 weight: 16-byte aligned pointers, word counts multiples of 16.
    ptx = compile_ptx(lp.__name__, "_l2_prefetch_kernel",
                      pointers={"words_ptr": "*i32", "tail_ptr": "*u8", "fold_ptr": "*i32"},
                      constexprs={"BLOCK": lp.BLOCK_WORDS, "TAIL": lp.TAIL_BYTES},
                      aligned={"words_ptr", "tail_ptr", "fold_ptr", "chunk_words", "n_words"},
                      num_warps=lp.NUM_WARPS)
    ops = memory_ops(ptx)
    global_loads = {op: n for op, n in ops.items() if op.startswith("ld.global")}
    vector = "ld.global.L1::evict_last.L2::cache_hint.v4.b32"
    # the body: BLOCK words per iteration in 16-byte loads, 4 words per thread per load
    assert global_loads.get(vector) == lp.BLOCK_WORDS // (lp.NUM_WARPS * 32 * 4), global_loads
    # besides those, only the tail's single byte load; every load carries the L2 policy operand
    assert set(global_loads) <= {vector, "ld.global.L1::evict_last.L2::cache_hint.b8"}, global_loads
    assert "createpolicy.fractional.L2::evict_last" in ptx
    # The folds keep the loads alive, but no store may run unless write_fold != 0: every global
    # store's predicate must be an AND of conditions, one of them `write_fold != 0`.
    index = lp._l2_prefetch_kernel.arg_names.index("write_fold")  # constexprs come after it
    flag = re.search(rf"ld\.param\.\w+\s+(%r\d+), \[\w+_param_{index}\];", ptx)
    assert flag, "write_fold is never read"
    stores = [ln.strip() for ln in ptx.splitlines() if re.search(r"\bst\.global", ln)]
    assert stores, "the fold store was compiled away: the loads may be next"
    for store in stores:
        m = re.match(r"@(%p\d+)\s+st\.global", store)
        assert m, f"unpredicated store: {store}"
        chain = _definition_chain(ptx, m.group(1))
        predicates = [ins for ins in chain if re.match(r"(setp|and|or|xor|not|selp)\.\S*\s+%p", ins)]
        assert all(ins.startswith(("setp.", "and.pred")) for ins in predicates), (store, chain)
        assert any(re.fullmatch(rf"setp\.ne\.\w+ %p\d+, {flag.group(1)}, 0", ins) for ins in predicates), \
            (store, chain)
