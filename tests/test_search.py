"""Search: beam search against brute-force enumeration on a stub decoder of hand-written tables, greedy search,
length limits, sampling and its filters, and the real model's incremental decoder (batching, caching)."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Callable

import pytest
import torch

from mt.search import (
    _fill_holes,
    _stay_with_parents,
    beam_search,
    greedy_search,
    length_penalty,
    max_lengths,
    sample,
    top_k_top_p_filter,
)

from conftest import recomputed_greedy

PAD, UNK, BOS, EOS, A, B = 0, 1, 2, 3, 4, 5
V = 6
WORDS = [t for t in range(V) if t not in (PAD, EOS)]  # what a search may output before EOS
EPS = 1e-6  # the probability of every token a hand-written table does not name

Table = Callable[[int, tuple], torch.Tensor]  # (sentence, output prefix) -> logits (V,)


# ---- a stub decoder: next-token logits are a function of the sentence and the whole prefix fed so far


class StubState:
    def __init__(self, sentence: torch.Tensor, history: torch.Tensor, step: int = 0):
        self.sentence = sentence  # (rows,) the source sentence of each row
        self.history = history  # (rows, step) tokens fed so far, BOS first
        self.step = step

    def select(self, index: torch.Tensor, sentences: torch.Tensor | None = None, group: int | None = None) -> "StubState":
        assert index.dtype == torch.long and index.dim() == 1
        return StubState(self.sentence[index], self.history[index], self.step)


class StubModel:
    """Duck-types the model's incremental interface. Because the logits depend on the whole prefix that the
    state's history holds, a search that reorders beams wrongly reads the wrong table. `rows_per_step` records
    the batch size of every decode_step call."""

    def __init__(self, table: Table):
        self.table = table
        self.rows_per_step: list[int] = []

    def start_decoding(self, src: torch.Tensor, max_len: int | None = None, beam_size: int = 1) -> StubState:
        self.rows_per_step = []
        n = src.size(0) * beam_size
        return StubState(torch.arange(src.size(0)).repeat_interleave(beam_size), torch.zeros(n, 0, dtype=torch.long))

    def decode_step(self, tokens: torch.Tensor, state: StubState) -> torch.Tensor:
        assert tokens.shape == state.sentence.shape and state.step == state.history.size(1)
        state.history = torch.cat([state.history, tokens.unsqueeze(1)], dim=1)
        assert (state.history[:, 0] == BOS).all()
        logits = torch.stack([self.table(s, tuple(h[1:]))
                              for s, h in zip(state.sentence.tolist(), state.history.tolist())])
        self.rows_per_step.append(len(logits))
        state.step += 1
        return logits

    def logprob(self, sentence: int, y: list[int]) -> float:
        """log P(y | sentence), PAD included in the normalisation (the search forbids it without
        renormalising)."""
        return sum(self.table(sentence, tuple(y[:t])).double().log_softmax(-1)[tok].item()
                   for t, tok in enumerate(y))


def random_table(seed: int, scale: float = 2.0) -> Table:
    """Gaussian logits, a fixed function of (seed, sentence, prefix), whatever order they are asked in."""
    memo: dict = {}

    def table(sentence: int, prefix: tuple) -> torch.Tensor:
        key = (sentence, prefix)
        if key not in memo:
            g = torch.Generator().manual_seed(hash((seed, *key)) % 2**62)
            memo[key] = torch.randn(V, generator=g) * scale
        return memo[key]

    return table


def hand_table(probs: dict[tuple, dict[int, float]], default: dict[int, float] | None = None) -> Table:
    """Hand-written probabilities per prefix, the same for every sentence; unnamed tokens get EPS, unnamed
    prefixes `default` (EOS for sure)."""
    default = default or {EOS: 1.0}
    memo: dict = {}

    def table(sentence: int, prefix: tuple) -> torch.Tensor:
        if prefix not in memo:
            p = torch.full((V,), EPS, dtype=torch.float64)
            for tok, q in probs.get(prefix, default).items():
                p[tok] = q
            memo[prefix] = p.log().float()
        return memo[prefix]

    return table


def all_outputs(max_len: int, min_len: int = 0):
    """Every output a search may give: words, then EOS, min_len <= |Y| <= max_len with EOS counted."""
    for n in range(max(min_len, 1) - 1, max_len):
        for body in itertools.product(WORDS, repeat=n):
            yield list(body) + [EOS]


def brute_force(stub: StubModel, sentence: int, max_len: int, alpha: float, min_len: int = 0):
    """[(log P(y) / lp(|y|), y)] over every output, best first."""
    scored = [(stub.logprob(sentence, y) / ((5 + len(y)) / 6) ** alpha, y) for y in all_outputs(max_len, min_len)]
    return sorted(scored, key=lambda x: -x[0])


def src_of(lengths: list[int]) -> torch.Tensor:
    """(len(lengths), max) source rows with the given numbers of non-pad tokens (their content is unused by
    the stub)."""
    src = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = 7
    return src


def hyp(out, i: int, k: int = 0) -> list[int]:
    return out.tokens[i, k, :int(out.lengths[i, k])].tolist()


IDS = dict(bos=BOS, eos=EOS, pad=PAD)


# ---- the small pure functions


def test_length_penalty_is_the_gnmt_formula():
    lengths = torch.tensor([1, 2, 7])
    torch.testing.assert_close(length_penalty(lengths, 0.6), torch.tensor([1.0, (7 / 6) ** 0.6, 2 ** 0.6]))
    torch.testing.assert_close(length_penalty(lengths, 0.0), torch.ones(3))


def test_max_length_is_a_times_the_non_pad_source_length_plus_b_per_sentence():
    src = src_of([3, 1, 6])
    assert max_lengths(src, PAD, 1.0, 50).tolist() == [53, 51, 56]
    assert max_lengths(src, PAD, 1.5, 2).tolist() == [6, 3, 11]  # floored
    assert max_lengths(src, PAD, 0.0, 0).tolist() == [1, 1, 1]  # room for EOS at least


def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_reaching_the_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 9, generator=g) * 2
    probs = logits.double().softmax(-1)
    for top_p in (0.05, 0.3, 0.5, 0.75, 0.9, 0.99):
        kept = top_k_top_p_filter(logits, top_p=top_p).isfinite()
        for row in range(len(logits)):
            order = probs[row].argsort(descending=True).tolist()
            cum = probs[row][order].cumsum(0)
            if (cum - top_p).abs().min() < 1e-6:
                continue  # too close to call in float32
            m = int((cum < top_p).sum()) + 1  # the smallest m whose top-m mass reaches top_p
            assert set(kept[row].nonzero().flatten().tolist()) == set(order[:m]), (top_p, row)
    # Mass exactly top_p is enough (uniform logits: the probabilities and their sums are exact in float32).
    assert top_k_top_p_filter(torch.zeros(1, 4), top_p=0.5).isfinite().sum() == 2


def test_top_k_keeps_the_k_most_likely_tokens_and_filters_compose():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert top_k_top_p_filter(logits, top_k=2).isfinite().tolist() == [[False, True, False, True, False]]
    assert top_k_top_p_filter(logits, top_k=9).isfinite().all()
    # top-k first, then the nucleus of what is left: 3.0 alone holds 73% of the top-2 mass.
    assert top_k_top_p_filter(logits, top_k=2, top_p=0.7).isfinite().tolist() == [[False, True] + [False] * 3]


# ---- beam search and greedy search on hand-written tables


@pytest.mark.parametrize("alpha,min_len", [(0.0, 0), (0.6, 0), (2.0, 0), (0.6, 3)])
def test_beam_search_nbest_matches_exhaustive_enumeration(alpha, min_len):
    max_len = 4
    stub = StubModel(random_table(seed=3))
    # Step t has at most 4**t live prefixes x 5 finite extensions (4 words, EOS): 5, 20, 80, then 64 forced
    # EOS. All fit within the top K = 128, as do all 85 outputs, so no prefix is ever dropped: exhaustive.
    out = beam_search(stub, src_of([2, 2]), **IDS, beam_size=128, alpha=alpha, nbest=5,
                      max_len_a=0.0, max_len_b=max_len, min_len=min_len)
    assert out.tokens.shape[:2] == (2, 5)
    for s in range(2):
        expected = brute_force(stub, s, max_len, alpha, min_len)[:5]
        assert [hyp(out, s, k) for k in range(5)] == [y for _, y in expected]
        torch.testing.assert_close(out.scores[s], torch.tensor([score for score, _ in expected]),
                                   atol=1e-5, rtol=1e-5)
        assert out.lengths[s].tolist() == [len(y) for _, y in expected]


# A table where the greedy choice is wrong: "A" is likelier first, but "B EOS" is the likeliest output.
GREEDY_TRAP = {(): {A: 0.6, B: 0.4}, (A,): {A: 0.45, B: 0.3, EOS: 0.25}, (A, A): {EOS: 1.0},
               (B,): {EOS: 0.9, A: 0.05, B: 0.05}}


def test_greedy_takes_the_hand_computed_path_and_beam_search_finds_the_better_output():
    stub = StubModel(hand_table(GREEDY_TRAP))
    greedy = greedy_search(stub, src_of([1]), **IDS, max_len_a=0.0, max_len_b=10)
    assert hyp(greedy, 0) == [A, A, EOS]
    assert greedy.scores[0, 0].item() == pytest.approx(math.log(0.6 * 0.45 * 1.0), abs=1e-4)
    assert greedy.lengths.tolist() == [[3]]
    beam = beam_search(stub, src_of([1]), **IDS, beam_size=2, alpha=0.0, nbest=2,
                       max_len_a=0.0, max_len_b=10)
    assert [hyp(beam, 0, 0), hyp(beam, 0, 1)] == [[B, EOS], [A, A, EOS]]
    torch.testing.assert_close(beam.scores[0], torch.tensor([math.log(0.36), math.log(0.27)]),
                               atol=1e-4, rtol=0)
    assert brute_force(stub, 0, 4, 0.0)[0][1] == [B, EOS]


def test_beam_search_keeps_going_while_a_live_hypothesis_can_still_win():
    # With alpha = 3 the long "B A A EOS" (P = 0.2) beats "EOS" (P = 0.5): -1.61 / 3.375 > -0.69 / 1. After
    # step 2 the beam holds two finished outputs ("EOS", "A EOS"); stopping there (fairseq's rule) misses it.
    table = hand_table({(): {EOS: 0.5, A: 0.3, B: 0.2}, (A,): {EOS: 0.6, A: 0.4}, (B,): {A: 1.0},
                        (B, A): {A: 1.0}, (B, A, A): {EOS: 1.0}})
    stub = StubModel(table)
    out = beam_search(stub, src_of([1]), **IDS, beam_size=2, alpha=3.0, max_len_a=0.0, max_len_b=6)
    best_score, best = brute_force(stub, 0, 6, 3.0)[0]
    assert best == [B, A, A, EOS] and hyp(out, 0) == best
    assert out.scores[0, 0].item() == pytest.approx(best_score, abs=1e-5)


def test_beam_size_1_without_length_penalty_equals_greedy_on_the_stub():
    stub = StubModel(random_table(seed=1))
    src = src_of([1, 2, 3, 4])
    kw = dict(**IDS, max_len_a=1.0, max_len_b=3)
    greedy = greedy_search(stub, src, **kw)
    beam = beam_search(stub, src, beam_size=1, alpha=0.0, **kw)
    assert torch.equal(greedy.tokens, beam.tokens) and torch.equal(greedy.lengths, beam.lengths)
    torch.testing.assert_close(greedy.scores, beam.scores)


EOS_FIRST = hand_table({}, default={EOS: 0.9, A: 0.05, B: 0.05})  # every sentence wants to stop at once
NEVER_EOS = hand_table({}, default={A: 0.6, B: 0.4})  # EOS only where forced (P = EPS)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_search_stops_as_soon_as_every_sentence_is_done(search):
    stub = StubModel(EOS_FIRST)
    kw = dict(**IDS, max_len_a=0.0, max_len_b=50)
    out = greedy_search(stub, src_of([3]), **kw) if search == "greedy" else \
        beam_search(stub, src_of([3]), **kw, beam_size=2, alpha=0.0)
    assert hyp(out, 0) == [EOS]
    # Beam search needs a second finished output, and a step to see that no live one can beat it.
    assert len(stub.rows_per_step) <= (1 if search == "greedy" else 3)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_finished_sentences_leave_the_batch(search):
    # Sentence 0 stops at once; sentence 1 never wants to, so runs to its limit of 8 alone.
    stub = StubModel(lambda s, prefix: (EOS_FIRST if s == 0 else NEVER_EOS)(s, prefix))
    kw = dict(**IDS, max_len_a=0.0, max_len_b=8)
    K = 1 if search == "greedy" else 3
    out = greedy_search(stub, src_of([2, 2]), **kw) if search == "greedy" else \
        beam_search(stub, src_of([2, 2]), **kw, beam_size=K, alpha=0.6)
    assert out.lengths[:, 0].tolist() == [1, 8]
    assert len(stub.rows_per_step) == 8
    # The first step decodes one row per sentence (a sentence's beams would all start from BOS alike); sentence
    # 0 is done after it, so every later step decodes sentence 1's K rows alone.
    assert stub.rows_per_step == [2] + [K] * 7


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_reading_the_host_every_few_steps_prunes_later_and_changes_nothing_else(search):
    stub = StubModel(lambda s, prefix: (EOS_FIRST if s == 0 else NEVER_EOS)(s, prefix))
    kw = dict(**IDS, max_len_a=0.0, max_len_b=8)
    K = 1 if search == "greedy" else 3
    outs, rows = [], []
    for every in (1, 3):
        out = greedy_search(stub, src_of([2, 2]), **kw, sync_every=every) if search == "greedy" else \
            beam_search(stub, src_of([2, 2]), **kw, beam_size=K, nbest=K, alpha=0.6, sync_every=every)
        outs.append(out)
        rows.append(stub.rows_per_step)
    for a, b in zip(outs[0].__dict__.values(), outs[1].__dict__.values()):
        assert torch.equal(a, b)
    # Sentence 0 is done after one step (greedy) or two (beam); with a read every 3 steps it stays in the
    # batch until step 3. The first step decodes one row per sentence.
    first = 1 if search == "greedy" else 2
    assert rows[0] == [2] + [2 * K] * (first - 1) + [K] * (8 - first)
    assert rows[1] == [2] + [2 * K] * 2 + [K] * 5
    with pytest.raises(ValueError, match="sync_every"):
        greedy_search(stub, src_of([2]), **kw, sync_every=0)


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_rows_without_eos_are_forced_to_end_at_their_own_limit(search):
    stub = StubModel(NEVER_EOS)
    src = src_of([3, 1, 5])
    kw = dict(**IDS, max_len_a=1.0, max_len_b=2)
    out = {"greedy": lambda: greedy_search(stub, src, **kw),
           "beam": lambda: beam_search(stub, src, **kw, beam_size=3, nbest=3),
           "sample": lambda: sample(stub, src, **kw, generator=torch.Generator().manual_seed(0))}[search]()
    limits = [5, 3, 7]
    assert out.tokens.shape[2] == max(limits)
    for i, limit in enumerate(limits):
        for k in range(out.tokens.size(1)):
            assert out.lengths[i, k] == limit
            y = out.tokens[i, k].tolist()
            assert y[limit - 1] == EOS and EOS not in y[:limit - 1] and PAD not in y[:limit]
            assert all(t == PAD for t in y[limit:])
    assert out.scores.isfinite().all()


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_min_len_delays_eos_and_the_limit_wins_over_it(search):
    stub = StubModel(EOS_FIRST)
    src = src_of([2, 2])

    def run(min_len: int, limit: int):
        kw = dict(**IDS, max_len_a=0.0, max_len_b=limit, min_len=min_len)
        if search == "greedy":
            return greedy_search(stub, src, **kw)
        if search == "beam":
            return beam_search(stub, src, **kw, beam_size=3, nbest=3)
        return sample(stub, src, **kw, generator=torch.Generator().manual_seed(0))

    out = run(min_len=4, limit=10)
    assert (out.lengths >= 4).all()
    assert not (out.tokens[:, :, :3] == EOS).any()
    if search != "beam":  # EOS is so likely that greedy search and sampling stop as soon as allowed
        assert (out.lengths == 4).all()
    fixed = run(min_len=20, limit=6)  # the benchmark's fixed-length output: min_len >= limit
    assert (fixed.lengths == 6).all() and (fixed.tokens[:, :, 5] == EOS).all()


def test_nbest_larger_than_the_beam_is_refused():
    with pytest.raises(ValueError, match="nbest"):
        beam_search(StubModel(EOS_FIRST), src_of([1]), **IDS, beam_size=2, nbest=3)


# ---- sampling


def test_sampling_with_top_k_1_equals_greedy():
    stub = StubModel(random_table(seed=5))
    src = src_of([1, 2, 3, 4])
    kw = dict(**IDS, max_len_a=1.0, max_len_b=3)
    greedy = greedy_search(stub, src, **kw)
    sampled = sample(stub, src, top_k=1, temperature=1.7, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(sampled.tokens, greedy.tokens)
    torch.testing.assert_close(sampled.scores, greedy.scores)


def test_sampling_with_a_seeded_generator_is_reproducible():
    stub = StubModel(random_table(seed=6, scale=0.5))
    src = src_of([4] * 8)
    kw = dict(**IDS, max_len_a=1.0, max_len_b=4)

    def run(seed: int):
        return sample(stub, src, **kw, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.scores, again.scores)
    assert not torch.equal(first.tokens, other.tokens)
    for i in range(src.size(0)):  # the score is the model's own log-prob of the sampled output
        assert first.scores[i, 0].item() == pytest.approx(stub.logprob(i, hyp(first, i)), abs=1e-4)


@pytest.mark.parametrize("temperature,top_p,expected", [
    (1.0, 1.0, {A: 0.6, B: 0.3, UNK: 0.1}),
    (2.0, 1.0, {A: 0.6 ** 0.5, B: 0.3 ** 0.5, UNK: 0.1 ** 0.5}),  # p ** (1 / T), renormalised below
    (1.0, 0.7, {A: 0.6, B: 0.3}),  # the nucleus: A alone (0.6) is short of 0.7
])
def test_sampling_draws_from_the_tempered_filtered_distribution(temperature, top_p, expected):
    stub = StubModel(hand_table({(): {A: 0.6, B: 0.3, UNK: 0.1 - 4 * EPS}}))
    n = 4000
    out = sample(stub, src_of([1] * n), **IDS, max_len_a=0.0, max_len_b=2, temperature=temperature, top_p=top_p,
                 generator=torch.Generator().manual_seed(0))
    first = out.tokens[:, 0, 0]
    total = sum(expected.values())
    for tok in WORDS:
        freq = first.eq(tok).float().mean().item()
        assert freq == pytest.approx(expected.get(tok, 0.0) / total, abs=0.03), tok


# ---- the real model


@pytest.fixture(scope="module")
def model():
    from mt.config import ModelConfig
    from mt.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
    return Transformer(cfg, src_vocab_size=40, tgt_vocab_size=40, pad_id=PAD).eval()


def sources() -> torch.Tensor:
    """(6, 8): rows of 8, 3, 6, 1, 5 and 2 tokens (the last one EOS), padded."""
    g = torch.Generator().manual_seed(4)
    src = torch.randint(4, 40, (6, 8), generator=g)
    for i, n in enumerate([8, 3, 6, 1, 5, 2]):
        src[i, n - 1] = EOS
        src[i, n:] = PAD
    return src


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_beam_size_1_equals_greedy_on_the_real_model(model, device):
    model, src = copy.deepcopy(model).to(device), sources().to(device)
    kw = dict(**IDS, max_len_b=6)
    greedy = greedy_search(model, src, **kw)
    beam = beam_search(model, src, beam_size=1, alpha=0.0, **kw)
    sampled = sample(model, src, **kw, generator=torch.Generator(device).manual_seed(0))
    for out in (greedy, beam, sampled):  # every output follows the input's device
        assert {out.tokens.device.type, out.scores.device.type, out.lengths.device.type} == {device}
    assert torch.equal(greedy.tokens, beam.tokens) and torch.equal(greedy.lengths, beam.lengths)
    torch.testing.assert_close(greedy.scores, beam.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_reading_the_host_every_few_steps_gives_the_same_output_on_the_real_model(model, search):
    src = sources()
    kw = dict(**IDS, max_len_b=6)
    run = (lambda e: greedy_search(model, src, **kw, sync_every=e)) if search == "greedy" else \
        (lambda e: beam_search(model, src, **kw, beam_size=3, nbest=3, sync_every=e))
    every_step, every_4 = run(1), run(4)
    assert torch.equal(every_step.tokens, every_4.tokens) and torch.equal(every_step.lengths, every_4.lengths)
    torch.testing.assert_close(every_step.scores, every_4.scores)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_sentence_decoded_alone_or_in_a_batch_gives_the_same_output(model, search):
    src = sources()
    kw = dict(**IDS, max_len_b=6)

    def run(s: torch.Tensor):
        if search == "greedy":
            return greedy_search(model, s, **kw)
        return beam_search(model, s, **kw, beam_size=3, nbest=2)

    together = run(src)
    for i in range(src.size(0)):
        alone = run(src[i:i + 1, :int(src[i].ne(PAD).sum())])  # no padding at all
        for k in range(together.tokens.size(1)):
            assert hyp(together, i, k) == hyp(alone, 0, k), (i, k)
            assert together.scores[i, k].item() == pytest.approx(alone.scores[0, k].item(), abs=1e-4)


def test_cached_decoding_agrees_with_recomputing_the_whole_prefix(model):
    src = sources()
    out = greedy_search(model, src, **IDS, max_len_a=1.0, max_len_b=4)
    for i in range(src.size(0)):
        tokens, total = recomputed_greedy(model, src[i:i + 1], int(src[i].ne(PAD).sum()) + 4, **IDS)
        assert hyp(out, i) == tokens, i
        assert out.scores[i, 0].item() == pytest.approx(total, abs=1e-4)


class Recomputed:
    """The real model behind the search's three calls without any cache: each step runs the whole teacher-forced
    pass over every row's prefix, and a state is the rows' sentences and prefixes. The reference for the
    incremental decoder's state, whatever rows a search moves or prunes."""

    def __init__(self, model):
        self.model = model

    def start_decoding(self, src: torch.Tensor, max_len: int | None = None, beam_size: int = 1) -> StubState:
        self.src = src
        return StubState(torch.arange(src.size(0)).repeat_interleave(beam_size),
                         torch.zeros(src.size(0) * beam_size, 0, dtype=torch.long))

    def decode_step(self, tokens: torch.Tensor, state: StubState) -> torch.Tensor:
        state.history = torch.cat([state.history, tokens.unsqueeze(1)], dim=1)
        return self.model(self.src[state.sentence], state.history)[:, -1]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_the_cached_search_moving_few_rows_in_place_equals_recomputing_every_prefix(model, search, monkeypatch):
    import mt.decoder_state

    src = sources()
    kw = dict(**IDS, max_len_b=6)
    run = (lambda m: greedy_search(m, src, **kw)) if search == "greedy" else \
        (lambda m: beam_search(m, src, **kw, beam_size=3, nbest=3))
    moved = []  # rows each select moved in place (None: it copied every row)
    spy = mt.decoder_state.moved_rows
    monkeypatch.setattr(mt.decoder_state, "moved_rows", lambda *a: moved.append(spy(*a)) or moved[-1])
    cached, reference = run(model), run(Recomputed(model))
    assert any(m is not None and 0 < m.numel() for m in moved)  # the in-place path ran and moved rows
    assert torch.equal(cached.tokens, reference.tokens) and torch.equal(cached.lengths, reference.lengths)
    torch.testing.assert_close(cached.scores, reference.scores, atol=1e-4, rtol=1e-4)


# ---- the CPU fast paths of a search step


def test_pruning_fills_the_holes_from_the_end_and_leaves_the_other_rows_in_place():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        alive = torch.rand(int(torch.randint(1, 12, (1,), generator=g)), generator=g) < 0.6
        count = int(alive.sum())
        keep = _fill_holes(alive, count)
        assert sorted(keep.tolist()) == alive.nonzero().squeeze(1).tolist()  # every alive row, once
        for place, row in enumerate(keep.tolist()):  # an alive row below count stays where it is
            assert row == place or not alive[place]
        moved = [row for place, row in enumerate(keep.tolist()) if row != place]
        assert moved == sorted(moved)  # the rows from the end fill the holes in order


def test_each_parents_first_child_takes_the_parents_beam():
    g = torch.Generator().manual_seed(0)
    parent = torch.randint(0, 4, (300, 4), generator=g)
    parent[0] = torch.tensor([2, 2, 2, 2])
    order = _stay_with_parents(parent)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(300, 4))  # a permutation of the children
    for p, o in zip(parent.tolist(), order.tolist()):
        beam_of = {child: beam for beam, child in enumerate(o)}
        firsts = {q: p.index(q) for q in set(p)}  # each parent's first (best) child
        assert all(beam_of[child] == q for q, child in firsts.items())
        extra = [child for child in range(4) if child not in firsts.values()]
        assert [beam_of[child] for child in extra] == sorted(set(range(4)) - set(p))  # free beams, in order


def test_block_top_k_equals_topk_with_ties_and_minus_infinity():
    from mt.search import _block_length, _top_k

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 4 * 8000, generator=g) * 3).round(decimals=1)  # many exact ties
    x[::5, 100:20000] = -math.inf
    x[7] = -math.inf  # a row with nothing finite
    assert _block_length(x.size(1), 8) is not None  # the block path is taken
    values, index = _top_k(x, 8)
    ref = x.topk(8, dim=1)
    assert torch.equal(values, ref.values)
    assert torch.equal(x.gather(1, index), values)  # the indices point at those values
    assert all(len(set(row.tolist())) == 8 for row in index)  # and never twice at one
    assert _block_length(4 * 8009, 8) is None  # 8009 is prime: no block length, plain topk
    assert _block_length(44, 8) is None  # too few elements for more than 4k blocks


def test_beam_search_through_block_top_k_equals_plain_topk(monkeypatch):
    import mt.search
    from mt.config import ModelConfig
    from mt.model import Transformer

    torch.manual_seed(0)
    big = Transformer(ModelConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0), 8000, 8000,
                      pad_id=PAD).eval()
    src = torch.randint(4, 8000, (5, 7))
    src[:, -1], src[2:, 4:] = EOS, PAD
    src[2:, 3] = EOS
    kw = dict(**IDS, beam_size=4, nbest=4, max_len_b=6)
    assert mt.search._block_length(4 * 8000, 8) is not None
    blocks = beam_search(big, src, **kw)
    monkeypatch.setattr(mt.search, "_top_k", lambda x, k: x.topk(k, dim=1))
    plain = beam_search(big, src, **kw)
    assert torch.equal(blocks.tokens, plain.tokens) and torch.equal(blocks.lengths, plain.lengths)
    assert torch.equal(blocks.scores, plain.scores)


def test_the_limit_pass_is_skipped_only_below_the_shortest_limit():
    from mt.search import _constrain_, _limit_range

    g = torch.Generator().manual_seed(0)
    lprobs = torch.randn(6, V, generator=g).log_softmax(-1)
    limit = torch.tensor([3, 5, 4, 3, 6, 5])
    lo, hi = _limit_range(limit)
    assert (lo, hi) == (3, 6) and _limit_range(limit[:0]) == (0, 0)
    for length in range(1, 8):
        full = _constrain_(lprobs.clone(), length, limit, eos=EOS, pad=PAD, min_len=2)
        fast = _constrain_(lprobs.clone(), length, limit, eos=EOS, pad=PAD, min_len=2, shortest_limit=lo)
        assert torch.equal(full, fast), length


def test_stopping_for_the_best_output_alone_keeps_it_exact():
    # With nbest = 1 a sentence stops once no live hypothesis can beat its best finished one, earlier than with
    # nbest = K (its K-th); the best output must be the same either way.
    for seed in range(6):
        stub = StubModel(random_table(seed=seed, scale=1.0))
        kw = dict(**IDS, beam_size=4, alpha=1.0, max_len_a=0.0, max_len_b=6)
        one, four = beam_search(stub, src_of([2, 3]), nbest=1, **kw), beam_search(stub, src_of([2, 3]), nbest=4, **kw)
        for s in range(2):
            assert hyp(one, s) == hyp(four, s, 0)
            torch.testing.assert_close(one.scores[s, 0], four.scores[s, 0])


def test_early_stop_ends_at_the_first_best_eos_where_exact_search_goes_on():
    # The table of the test above: EOS is the best first candidate, but "B A A EOS" wins with alpha = 3.
    table = hand_table({(): {EOS: 0.5, A: 0.3, B: 0.2}, (A,): {EOS: 0.6, A: 0.4}, (B,): {A: 1.0},
                        (B, A): {A: 1.0}, (B, A, A): {EOS: 1.0}})
    kw = dict(**IDS, beam_size=2, alpha=3.0, max_len_a=0.0, max_len_b=6)
    assert hyp(beam_search(StubModel(table), src_of([1]), **kw), 0) == [B, A, A, EOS]
    assert hyp(beam_search(StubModel(table), src_of([1]), early_stop=True, **kw), 0) == [EOS]


# ---- prefixes and ensembles


def beam3(*args, **kwargs):
    return beam_search(*args, beam_size=3, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_prefix_beam_search_matches_exhaustive_search_over_outputs_that_start_with_it(alpha):
    max_len = 4
    stub = StubModel(random_table(seed=5))
    prefixes = [[B], [A, A], []]  # per sentence; the empty one is free
    prefix = torch.full((3, 2), PAD)
    for i, p in enumerate(prefixes):
        prefix[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    out = beam_search(stub, src_of([2, 2, 2]), **IDS, beam_size=128, alpha=alpha, nbest=3,
                      max_len_a=0.0, max_len_b=max_len, prefix=prefix)
    for s, p in enumerate(prefixes):
        expected = [(score, y) for score, y in brute_force(stub, s, max_len, alpha) if y[:len(p)] == p][:3]
        assert [hyp(out, s, k) for k in range(3)] == [y for _, y in expected]
        torch.testing.assert_close(out.scores[s], torch.tensor([sc for sc, _ in expected]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("search", ["greedy", "sample"])
def test_prefix_starts_greedy_and_sampled_outputs_and_counts_in_their_score(search):
    stub = StubModel(hand_table(GREEDY_TRAP))
    prefix = torch.tensor([[B, PAD], [A, B]])
    run = greedy_search if search == "greedy" else sample
    out = run(stub, src_of([2, 2]), **IDS, max_len_a=0.0, max_len_b=4, prefix=prefix)
    assert hyp(out, 0)[:1] == [B] and hyp(out, 1)[:2] == [A, B]
    for s in range(2):
        torch.testing.assert_close(out.scores[s, 0].double(), torch.tensor(stub.logprob(s, hyp(out, s)), dtype=torch.float64),
                                   atol=1e-4, rtol=1e-4)


def test_a_prefix_longer_than_the_limit_raises_the_limit_to_fit_it_and_eos():
    stub = StubModel(random_table(seed=6))
    prefix = torch.tensor([[A, B, A, B]])
    for search in (greedy_search, beam3):
        out = search(stub, src_of([2]), **IDS, max_len_a=0.0, max_len_b=2, prefix=prefix)
        assert hyp(out, 0) == [A, B, A, B, EOS]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_an_ensemble_of_a_model_with_itself_decodes_as_the_model(model, search):
    from mt.search import Ensemble

    src = sources()
    run = greedy_search if search == "greedy" else beam3
    alone = run(model, src, **IDS, max_len_b=8)
    pair = run(Ensemble([model, model]), src, **IDS, max_len_b=8)
    assert torch.equal(alone.tokens, pair.tokens)
    torch.testing.assert_close(alone.scores, pair.scores, atol=1e-5, rtol=1e-5)


def test_an_ensemble_step_is_the_mean_of_the_models_log_probabilities(model):
    from mt.search import Ensemble

    other = copy.deepcopy(model)
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.add_(torch.randn_like(p) * 0.5)
    src, tokens = sources(), torch.full((6,), BOS)
    with torch.inference_mode():
        expected = (model.decode_step(tokens, model.start_decoding(src)).log_softmax(-1)
                    + other.decode_step(tokens, other.start_decoding(src)).log_softmax(-1)) / 2
        ensemble = Ensemble([model, other])
        got = ensemble.decode_step(tokens, ensemble.start_decoding(src))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Beam search over it reorders both models' states together: the same as its own greedy at beam 1.
    beam = beam_search(ensemble, src, **IDS, beam_size=1, alpha=0.0, max_len_b=6)
    greedy = greedy_search(ensemble, src, **IDS, max_len_b=6)
    assert torch.equal(beam.tokens, greedy.tokens)
