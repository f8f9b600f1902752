"""Search: beam search against brute force on a stub decoder, greedy, sampling, and the real model's cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from mt.config import ModelConfig
from mt.model import Transformer
from mt.search import beam_search, greedy_search, length_penalty, sample, top_k_top_p_filter

PAD, BOS, EOS = 0, 2, 3
V = 6  # pad, unk, bos, eos and two words


@dataclass
class StubState:
    history: torch.Tensor  # (R, step) tokens fed so far
    sentence: torch.Tensor  # (R,) which source row each row decodes
    step: int = 0

    def select(self, index):
        return StubState(self.history[index], self.sentence[index], self.step)


class StubModel:
    """A decoder whose next-token log-probabilities are a hand-made table indexed by (sentence, step,
    previous token): search results can be checked against enumeration of every output."""

    def __init__(self, n_sentences: int, steps: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(n_sentences, steps, V, V, generator=g) * 2.0

    def start_decoding(self, src, max_len=None):
        return StubState(torch.zeros(src.size(0), 0, dtype=torch.long), torch.arange(src.size(0)))

    def decode_step(self, tokens, state):
        state.history = torch.cat([state.history, tokens.unsqueeze(1)], 1)
        logits = self.table[state.sentence, state.step, tokens]
        state.step += 1
        return logits

    def logprob(self, sentence: int, seq: list[int]) -> float:
        total, prev = 0.0, BOS
        for t, tok in enumerate(seq):
            total += self.table[sentence, t, prev].log_softmax(-1)[tok].item()
            prev = tok
        return total


def all_outputs(max_len: int):
    """Every output the search may produce: non-EOS tokens then EOS, at most max_len tokens in all."""
    for n in range(max_len):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=n):
            yield list(body) + [EOS]


def brute_force(stub: StubModel, sentence: int, max_len: int, alpha: float):
    scored = [(stub.logprob(sentence, y) / length_penalty(torch.tensor(len(y)), alpha).item(), y)
              for y in all_outputs(max_len)]
    return sorted(scored, key=lambda x: -x[0])


def src_of(n: int, length: int = 3) -> torch.Tensor:
    return torch.full((n, length), 5, dtype=torch.long)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_large_beam_finds_the_exhaustive_best_and_nbest(alpha):
    max_len = 4
    stub = StubModel(2, max_len, seed=3)
    out = beam_search(stub, src_of(2), bos=BOS, eos=EOS, pad=PAD, beam_size=200, length_penalty=alpha,
                      nbest=3, max_len_a=0.0, max_len_b=max_len)
    for s in range(2):
        expected = brute_force(stub, s, max_len, alpha)[:3]
        for k, (score, seq) in enumerate(expected):
            got = out.tokens[s, k, :out.lengths[s, k]].tolist()
            assert got == seq, (s, k)
            assert out.scores[s, k].item() == pytest.approx(score, abs=1e-5)


def test_beam_size_1_equals_greedy_on_the_stub():
    stub = StubModel(3, 5, seed=1)
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=0.0, max_len_b=5)
    greedy = greedy_search(stub, src_of(3), **kw)
    beam = beam_search(stub, src_of(3), beam_size=1, length_penalty=0.0, **kw)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores)


def test_greedy_follows_the_argmax_path_of_the_tables():
    stub = StubModel(1, 5, seed=7)
    out = greedy_search(stub, src_of(1), bos=BOS, eos=EOS, pad=PAD, max_len_a=0.0, max_len_b=5)
    prev, expected = BOS, []
    for t in range(5):
        row = stub.table[0, t, prev].clone()
        if t == 4:  # the limit: only EOS remains
            row[[i for i in range(V) if i != EOS]] = -torch.inf
        prev = int(row.argmax())
        expected.append(prev)
        if prev == EOS:
            break
    assert out.tokens[0, 0, :out.lengths[0, 0]].tolist() == expected
    assert out.scores[0, 0].item() == pytest.approx(stub.logprob(0, expected), abs=1e-5)


def test_max_length_is_per_sentence_and_min_len_delays_eos():
    stub = StubModel(2, 12, seed=2)
    src = torch.tensor([[5, 5, 0, 0], [5, 5, 5, 5]])  # 2 and 4 real tokens
    out = beam_search(stub, src, bos=BOS, eos=EOS, pad=PAD, beam_size=3, max_len_a=1.0, max_len_b=3)
    assert out.lengths[0, 0] <= 5 and out.lengths[1, 0] <= 7
    for search in (greedy_search, beam_search):
        fixed = search(stub, src, bos=BOS, eos=EOS, pad=PAD, max_len_a=0.0, max_len_b=6, min_len=6)
        assert fixed.lengths[:, 0].tolist() == [6, 6]
        assert (fixed.tokens[:, 0, :5] != EOS).all() and (fixed.tokens[:, 0, 5] == EOS).all()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_k_top_p_filter(probs.log(), top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = top_k_top_p_filter(probs.log(), top_p=0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = top_k_top_p_filter(probs.log(), top_k=1).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats():
    stub = StubModel(4, 6, seed=5)
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=0.0, max_len_b=6)
    greedy = greedy_search(stub, src_of(4), **kw)
    assert torch.equal(sample(stub, src_of(4), top_k=1, **kw).tokens, greedy.tokens)
    a = sample(stub, src_of(4), temperature=1.5, generator=torch.Generator().manual_seed(1), **kw)
    b = sample(stub, src_of(4), temperature=1.5, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.tokens, b.tokens)


# ---- with the real model


def real_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
    return Transformer(cfg, 40, 40, pad_id=PAD, share_all_embeddings=True).eval()


def sources() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    src = torch.randint(4, 40, (5, 8), generator=g)
    for i, n in enumerate([8, 3, 6, 1, 5]):
        src[i, n - 1] = EOS
        src[i, n:] = PAD
    return src


def test_beam_size_1_equals_greedy_on_the_real_model():
    model, src = real_model(), sources()
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len_b=10)
    greedy = greedy_search(model, src, **kw)
    beam = beam_search(model, src, beam_size=1, length_penalty=0.0, **kw)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_sentence_alone_and_in_a_batch_gives_the_same_output(search):
    model, src = real_model(), sources()
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len_b=10)
    run = (lambda s: greedy_search(model, s, **kw)) if search == "greedy" else \
        (lambda s: beam_search(model, s, beam_size=4, nbest=2, **kw))
    together = run(src)
    for i in range(src.size(0)):
        n = int(src[i].ne(PAD).sum())
        alone = run(src[i:i + 1, :n])
        for k in range(together.tokens.size(1)):
            length = int(together.lengths[i, k])
            assert together.tokens[i, k, :length].tolist() == alone.tokens[0, k, :length].tolist()
            assert together.scores[i, k].item() == pytest.approx(alone.scores[0, k].item(), abs=1e-4)


def test_cached_decoding_agrees_with_recomputing_the_whole_prefix():
    model, src = real_model(), sources()
    out = greedy_search(model, src, bos=BOS, eos=EOS, pad=PAD, max_len_a=0.0, max_len_b=7)
    with torch.no_grad():  # reference: no cache, the full forward pass over the prefix at every step
        prefix = torch.full((src.size(0), 1), BOS)
        for _ in range(7):
            logits = model(src, prefix)[:, -1]
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], 1)
    for i in range(src.size(0)):
        got = out.tokens[i, 0, :int(out.lengths[i, 0])].tolist()
        # The first six choices are free in both; the seventh is EOS in the search (its length limit).
        free = min(len(got), 6)
        assert got[:free] == prefix[i, 1:1 + free].tolist()
        assert got[-1] == EOS
