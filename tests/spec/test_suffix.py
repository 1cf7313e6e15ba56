"""SuffixProposer (workers/spec/suffix.py): what it proposes, from which source, at what cost.

Token traces are built here; a brute-force reference (a scan of every live token for the longest
matching suffix) checks the trie's answers on random traces with evictions.
"""

from __future__ import annotations

import random

import pytest
from shardserve.workers.spec.suffix import SuffixProposer

MAX_DEPTH = 24


def task_output(seed: int, length: int = 60) -> list[int]:
    """A distinct-token "answer" (ids 1000+) that repeated tasks reproduce."""
    rng = random.Random(seed)
    return rng.sample(range(1000, 30000), length)


# --- the cross-request cache -------------------------------------------------------------------


def test_repeated_task_trace_proposes_the_rest() -> None:
    proposer = SuffixProposer()
    answer = task_output(1)
    changed = list(answer)
    changed[30] = 7  # one earlier run wrote a different token at 30
    for index, output in enumerate([answer, changed, answer]):
        proposer.finish(f"old{index}", [1, 2, 3, 4] + output, num_prompt_tokens=4)
    assert proposer.num_cached_tokens == 3 * len(answer)

    context = [9, 9, 9] + answer[:10]  # another prompt, the same answer begun
    assert proposer.propose("new", context, num_prompt_tokens=3, max_tokens=8) == answer[10:18]
    # Past the changed token (2 of 3 runs agree there: cumulative probability 2/3) to the end.
    assert proposer.propose("new", context, num_prompt_tokens=3, max_tokens=100) == answer[10:]


def test_conflicting_continuations_choose_by_frequency_and_stop_at_min_probability() -> None:
    common = task_output(2, 20)
    branch_a, branch_b = task_output(3, 10), task_output(4, 10)
    outputs = [common + branch_a, common + branch_b, common + branch_a, common + branch_a]
    context = [5] + common[:12]

    def propose(min_probability: float, runs: list[list[int]]) -> list[int]:
        proposer = SuffixProposer(min_probability=min_probability)
        for index, output in enumerate(runs):
            proposer.finish(f"r{index}", [5] + output, num_prompt_tokens=1)
        return proposer.propose("q", context, num_prompt_tokens=1, max_tokens=30)

    # 3 of 4 runs continue with branch a: probability 0.75 from the fork on.
    assert propose(0.1, outputs) == common[12:] + branch_a
    assert propose(0.75, outputs) == common[12:] + branch_a
    assert propose(0.8, outputs) == common[12:]  # 0.75 < 0.8: the draft stops at the fork
    # A tie (one run each) goes to the newest run; 0.5 is below 0.6.
    assert propose(0.1, [common + branch_a, common + branch_b]) == common[12:] + branch_b
    assert propose(0.6, [common + branch_a, common + branch_b]) == common[12:]


def test_longest_suffix_wins_over_more_frequent_shorter_ones() -> None:
    proposer = SuffixProposer()
    # "50 60" is followed by 70 in four runs, but "40 50 60" (longer) only once, by 80.
    for index in range(4):
        proposer.finish(f"a{index}", [0, 11, 50, 60, 70, 71], num_prompt_tokens=1)
    proposer.finish("b", [0, 40, 50, 60, 80, 81], num_prompt_tokens=1)
    assert proposer.propose("q", [3, 40, 50, 60], num_prompt_tokens=1, max_tokens=5) == [80, 81]
    # Only "50 60" matches: five occurrences, 70 after four of them (0.8), 80 after the newest one.
    assert proposer.propose("r", [3, 41, 50, 60], num_prompt_tokens=1, max_tokens=5) == [70, 71]
    with_min = SuffixProposer(min_probability=0.9)
    for index in range(4):
        with_min.finish(f"a{index}", [0, 11, 50, 60, 70, 71], num_prompt_tokens=1)
    with_min.finish("b", [0, 40, 50, 60, 80, 81], num_prompt_tokens=1)
    assert with_min.propose("r", [3, 41, 50, 60], num_prompt_tokens=1, max_tokens=5) == []  # 0.8 < 0.9
    assert with_min.propose("q", [3, 40, 50, 60], num_prompt_tokens=1, max_tokens=5) == [80, 81]  # 1 of 1


def test_only_outputs_are_cached() -> None:
    proposer = SuffixProposer()
    prompt, output = task_output(5, 30), task_output(6, 30)
    proposer.finish("old", prompt + output, num_prompt_tokens=len(prompt))
    assert proposer.num_cached_tokens == len(output)
    assert proposer.propose("a", [1] + prompt[:5], num_prompt_tokens=1, max_tokens=4) == []
    assert proposer.propose("b", [1] + output[:5], num_prompt_tokens=1, max_tokens=4) == output[5:9]


# --- the request's own context ------------------------------------------------------------------


def test_own_prompt_continues_a_repeated_phrase() -> None:
    a, b, c, d, e = 101, 102, 103, 104, 105
    prompt = [1, 2, a, b, c, d, e, 3, 4]
    tokens = prompt + [5, 6, a, b]  # the output so far ends in "A B"
    proposer = SuffixProposer()
    assert proposer.propose("r", tokens, num_prompt_tokens=len(prompt), max_tokens=3) == [c, d, e]
    assert proposer.propose("r", tokens, num_prompt_tokens=len(prompt), max_tokens=6) == [c, d, e, 3, 4, 5]


def test_own_context_beats_a_weaker_cache_match() -> None:
    proposer = SuffixProposer()
    proposer.finish("old", [0, 20, 21, 30, 31], num_prompt_tokens=1)  # "21" then 30 31
    tokens = [20, 21, 40, 41, 42, 9, 20, 21]  # "20 21" (longer) then 40 41 42 in the prompt
    assert proposer.propose("r", tokens, num_prompt_tokens=6, max_tokens=3) == [40, 41, 42]


def test_request_state_follows_the_token_list() -> None:
    proposer = SuffixProposer()
    tokens = [1, 2, 3, 4, 1, 2]
    assert proposer.propose("r", tokens, num_prompt_tokens=2, max_tokens=2) == [3, 4]
    tokens += [3, 9, 1, 2]  # the same list, grown: "1 2 3" now continues with 9 (newest) or 4
    assert proposer.propose("r", tokens, num_prompt_tokens=2, max_tokens=2) == [3, 9]
    # A shorter list (the contract says it only grows) is indexed afresh, never read past its end.
    assert proposer.propose("r", [5, 6, 5], num_prompt_tokens=2, max_tokens=2) == [6, 5]
    proposer.finish("r", [5, 6, 5], num_prompt_tokens=3)
    assert proposer.propose("r", [1, 2], num_prompt_tokens=1, max_tokens=2) == []  # a fresh request "r"


def test_nothing_matching_and_max_tokens() -> None:
    proposer = SuffixProposer()
    answer = task_output(7)
    proposer.finish("old", [0] + answer, num_prompt_tokens=1)
    assert proposer.propose("a", [1, 2, 3, 4], num_prompt_tokens=2, max_tokens=8) == []
    assert proposer.propose("b", [], num_prompt_tokens=0, max_tokens=8) == []
    assert proposer.propose("c", [1] + answer[:3], num_prompt_tokens=1, max_tokens=0) == []
    for max_tokens in (1, 5, 56):
        draft = proposer.propose("c", [1] + answer[:3], num_prompt_tokens=1, max_tokens=max_tokens)
        assert draft == answer[3:3 + max_tokens]
    assert proposer.propose("c", [1] + answer[:3], num_prompt_tokens=1, max_tokens=500) == answer[3:]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_cached_tokens": -1}, "max_cached_tokens"),
    ({"max_depth": 0}, "max_depth"),
    ({"min_probability": 1.5}, "min_probability"),
    ({"max_matches": 0}, "max_matches"),
    ({"max_depth": 2.5}, "max_depth"),
])
def test_bad_settings_are_refused_with_the_range(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be .*\[.*\]"):
        SuffixProposer(**kwargs)


def test_bad_arguments_are_refused() -> None:
    proposer = SuffixProposer()
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[0, "):
        proposer.propose("r", [1, 2], num_prompt_tokens=1, max_tokens=-1)
    with pytest.raises(ValueError, match=r"num_prompt_tokens must be an integer in \[0, 2\]"):
        proposer.propose("r", [1, 2], num_prompt_tokens=3, max_tokens=2)
    with pytest.raises(ValueError, match=r"num_prompt_tokens must be an integer in \[0, 2\]"):
        proposer.finish("r", [1, 2], num_prompt_tokens=-1)


# --- bounded memory -----------------------------------------------------------------------------


def test_cache_is_bounded_and_forgets_the_oldest_requests() -> None:
    bound = 100
    proposer = SuffixProposer(max_cached_tokens=bound)
    outputs = [task_output(100 + index, 30) for index in range(8)]
    for index, output in enumerate(outputs):
        proposer.finish(f"r{index}", [0] + output, num_prompt_tokens=1)
        assert proposer.num_cached_tokens <= bound
    assert proposer.num_cached_tokens == 90  # the newest three requests
    assert proposer.propose("q0", [1] + outputs[0][:4], num_prompt_tokens=1, max_tokens=4) == []
    assert proposer.propose("q4", [1] + outputs[4][:4], num_prompt_tokens=1, max_tokens=4) == []
    assert proposer.propose("q5", [1] + outputs[5][:4], num_prompt_tokens=1, max_tokens=4) == outputs[5][4:8]
    assert proposer.propose("q7", [1] + outputs[7][:4], num_prompt_tokens=1, max_tokens=4) == outputs[7][4:8]
    # An output longer than the bound keeps its last max_cached_tokens tokens.
    long_output = task_output(200, 150)
    proposer.finish("long", [0] + long_output, num_prompt_tokens=1)
    assert proposer.num_cached_tokens == bound
    assert proposer.propose("q", [1] + long_output[50:53], num_prompt_tokens=1, max_tokens=4) == long_output[53:57]
    assert proposer.propose("p", [1] + long_output[10:13], num_prompt_tokens=1, max_tokens=4) == []


def test_a_zero_bound_disables_the_cache_only() -> None:
    proposer = SuffixProposer(max_cached_tokens=0)
    answer = task_output(12, 20)
    proposer.finish("old", [0] + answer, num_prompt_tokens=1)
    assert proposer.num_cached_tokens == 0 and proposer.num_cache_nodes == 0
    assert proposer.propose("q", [1] + answer[:4], num_prompt_tokens=1, max_tokens=4) == []
    assert proposer.propose("r", answer[:8] + answer[:4], num_prompt_tokens=1, max_tokens=4) == answer[4:8]


def test_eviction_frees_the_trie_nodes() -> None:
    # Repetitive outputs share deep nodes; once they are evicted, only the last output's nodes stay.
    rng = random.Random(3)
    proposer = SuffixProposer(max_cached_tokens=400, max_depth=8)
    for index in range(60):
        phrase = [rng.randrange(6) for _ in range(5)]
        proposer.finish(f"r{index}", [0] + phrase * rng.randint(4, 12), num_prompt_tokens=1)
    last_output = task_output(300, 400)
    proposer.finish("last", [0] + last_output, num_prompt_tokens=1)
    fresh = SuffixProposer(max_cached_tokens=400, max_depth=8)
    fresh.finish("last", [0] + last_output, num_prompt_tokens=1)
    assert proposer.num_cached_tokens == 400
    assert proposer.num_cache_nodes == fresh.num_cache_nodes == 400  # one leaf per distinct token


# --- cost ----------------------------------------------------------------------------------------


def test_indexing_is_incremental() -> None:
    """2,000 proposals on one request growing to 20,000 tokens: each call indexes only its new tokens."""
    rng = random.Random(0)
    phrase = [rng.randrange(50) for _ in range(40)]
    proposer = SuffixProposer()
    tokens = phrase[:20]  # the same list object, appended in place
    proposer.propose("r", tokens, num_prompt_tokens=20, max_tokens=4)
    assert proposer.num_indexed == len(tokens) - 1
    while len(tokens) < 20_000:
        before_indexed, before_steps = proposer.num_indexed, proposer.num_index_steps
        appended = [phrase[len(tokens) % len(phrase)] if rng.random() < 0.95 else rng.randrange(50)
                    for _ in range(10)]
        tokens.extend(appended)
        proposer.propose("r", tokens, num_prompt_tokens=20, max_tokens=4)
        assert proposer.num_indexed - before_indexed == len(appended)
        assert proposer.num_index_steps - before_steps <= MAX_DEPTH * len(appended)
    assert proposer.num_indexed == len(tokens) - 1 == 19_999


# --- acceptance ----------------------------------------------------------------------------------


def simulate(proposer: SuffixProposer, request_id: str, prompt: list[int], target: list[int],
             k: int = 8) -> float:
    """Greedy speculative decoding against a fixed target: accept the draft's longest prefix equal to the
    target, then the target's own next token; returns the mean accepted draft tokens per step."""
    tokens = list(prompt)
    accepted_total = steps = 0
    while len(tokens) - len(prompt) < len(target):
        produced = len(tokens) - len(prompt)
        draft = proposer.propose(request_id, tokens, len(prompt), min(k, len(target) - produced - 1))
        expected = target[produced:produced + len(draft)]
        accepted = next((i for i, (a, b) in enumerate(zip(draft, expected, strict=True)) if a != b), len(draft))
        tokens.extend(target[produced:produced + accepted + 1])
        accepted_total += accepted
        steps += 1
    assert tokens[len(prompt):] == target
    proposer.finish(request_id, tokens, len(prompt))
    return accepted_total / steps


def test_acceptance_on_a_repeated_task_trace() -> None:
    proposer = SuffixProposer()
    rng = random.Random(1)
    answer = task_output(9, 120)
    first = simulate(proposer, "first", [1, 2, 3], answer)
    assert first < 0.1  # nothing to draft from yet
    rates = []
    for index in range(5):  # the same task again, with a few tokens changed each time
        variant = list(answer)
        for position in rng.sample(range(len(answer)), 3):
            variant[position] = rng.randrange(1000)
        rates.append(simulate(proposer, f"again{index}", [1, 2, 4 + index], variant))
    assert min(rates) >= 3.0, rates


def test_acceptance_on_a_request_that_repeats_itself() -> None:
    proposer = SuffixProposer()
    block = task_output(10, 20)
    rate = simulate(proposer, "r", [7, 8], block * 10)  # the first copy is new, the other nine drafted
    assert rate >= 3.0, rate


def test_acceptance_when_quoting_the_prompt() -> None:
    proposer = SuffixProposer()
    text = task_output(11, 200)  # "repeat this list with one change"
    answer = list(text)
    answer[100] = 5
    rate = simulate(proposer, "r", [1, 2] + text + [3, 4], answer)
    assert rate >= 3.0, rate


# --- against a brute-force reference --------------------------------------------------------------


def reference_draft(sources: list[list[int]], context: list[int], max_depth: int, max_matches: int,
                    min_probability: float, max_tokens: int, own: bool) -> tuple[list[int], float, int]:
    """The specification by brute force: every occurrence of every suffix length, newest first;
    (draft, score, matched suffix length)."""
    ends = [(s, e) for s, seq in enumerate(sources) for e in range(len(seq) - (1 if own else 0))]
    ends.reverse()  # newest first
    for length in range(min(max_depth, len(context)), 0, -1):
        found = [(s, e) for s, e in ends
                 if e + 1 >= length and sources[s][e + 1 - length:e + 1] == context[len(context) - length:]]
        if found:
            break
    else:
        return [], 0.0, 0
    found = found[:max_matches]
    agreeing, draft, score = found, [], 0.0
    for offset in range(1, max_tokens + 1):
        nexts = [sources[s][e + offset] for s, e in agreeing if e + offset < len(sources[s])]
        if not nexts:
            break
        best = max(dict.fromkeys(nexts), key=nexts.count)
        if nexts.count(best) / len(found) < min_probability:
            break
        draft.append(best)
        score += nexts.count(best) / len(found)
        agreeing = [(s, e) for s, e in agreeing if e + offset < len(sources[s]) and sources[s][e + offset] == best]
    return draft, score, length


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_brute_force_reference_with_evictions(seed: int) -> None:
    rng = random.Random(seed)
    max_depth, max_matches = rng.randint(1, 8), rng.randint(1, 6)
    min_probability, bound, vocab = rng.choice([0.0, 0.1, 0.3, 0.5, 1.0]), rng.choice([5, 30, 60]), rng.randint(2, 5)
    proposer = SuffixProposer(max_cached_tokens=bound, max_depth=max_depth, min_probability=min_probability,
                              max_matches=max_matches)
    live: list[list[int]] = []  # the reference's cache: outputs of finished requests, oldest first
    for request in range(30):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        tokens = list(prompt)
        for _ in range(rng.randint(1, 20)):
            k = rng.randint(0, 6)
            draft = proposer.propose(f"r{request}", tokens, len(prompt), k)
            if k and tokens:
                own = reference_draft([tokens], tokens, max_depth, max_matches, min_probability, k, own=True)
                cached = reference_draft(live, tokens, max_depth, max_matches, min_probability, k, own=False)
                # ties on score: the deeper match, then the longer draft, then the request's own context
                expected = cached[0] if (cached[1], cached[2], len(cached[0])) > (own[1], own[2], len(own[0])) \
                    else own[0]
                assert draft == expected, (seed, request, tokens)
            else:
                assert draft == []
            tokens.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 3)))
        proposer.finish(f"r{request}", tokens, len(prompt))
        output = tokens[len(prompt):][-bound:]
        live.append(output)
        while sum(map(len, live)) > bound:
            live.pop(0)
        assert proposer.num_cached_tokens == sum(map(len, live))
    # Evictions left no node behind: the trie equals one built from the live outputs alone.
    fresh = SuffixProposer(max_cached_tokens=bound, max_depth=max_depth)
    for index, output in enumerate(live):
        fresh.finish(f"f{index}", output, num_prompt_tokens=0)
    assert proposer.num_cache_nodes == fresh.num_cache_nodes
