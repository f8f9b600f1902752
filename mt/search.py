"""Search over the model's incremental decoder: greedy, beam (Section 6.1) and sampling.

A search talks to the model through three calls only (duck typing, so tests drive it with a stub decoder):

    state = model.start_decoding(src, max_len, beam_size)   encode once; beam_size rows per sentence (search: 1)
    logits = model.decode_step(tokens, state)                one position for every row, caches updated in place
    state = state.select(index, sentences, group)            reorder / prune / widen rows (see DecoderState)

Sentences and beams are rows of one batch; the one Python loop is over time steps. `Ensemble` makes several
models one model of the same three calls.

Conventions shared by all searches:

- A length |Y| counts output tokens *including* the final EOS (as fairseq does), everywhere: the per-sentence
  limit `max_len_a * (non-pad source tokens) + max_len_b` (floored, at least 1), `min_len`, the length
  penalty and `SearchOutput.lengths`. So `min_len = limit` gives exactly `limit` tokens, the last one EOS.
- EOS is forbidden while |Y| < min_len; at the limit EOS is the only choice. The limit wins over min_len.
  A forced EOS keeps the model's own log-probability, so a score is always log P(Y | X) (length-normalised
  for beam search).
- PAD is never produced: the model is never trained to predict it, and the output is padded with it.
- A prefix (batch, prefix_len), padded with pad, forces each sentence's first output tokens: every other token
  is ruled out while it lasts, and the forced tokens' log-probabilities count in the score. The limit is
  raised to fit the prefix and its EOS.
- Host synchronisation: one small read (how many sentences/rows are done) every `sync_every` steps, which is
  what lets the search stop early and drop finished sentences from the batch. On a CPU it costs nothing and
  happens every step; on a GPU (default every 8 steps) it would otherwise stall the host's run-ahead at every
  step, so a finished row is carried, emitting nothing, until the next read. Pruning indices are built on
  the device from that count (`_rows_where`), without `nonzero`'s second read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SearchOutput:
    """Up to `nbest` hypotheses per sentence, best first.

    tokens: (batch, nbest, out_len) long, without BOS, ending in EOS, padded with pad.
    scores: (batch, nbest) float32, the score the search ranks by: the sum of log-probs for greedy search and
        sampling, the sum divided by `length_penalty(lengths, alpha)` for beam search. A beam search slot
        no hypothesis filled (fewer than nbest outputs possible, as with a limit of 1, or EOS given
        probability zero) has score -inf, length 0 and only pad.
    lengths: (batch, nbest) long, output tokens including EOS.
    """

    tokens: Tensor
    scores: Tensor
    lengths: Tensor


# ---- small pure functions


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016, Section 7; alpha = 0.6 in Vaswani et al.,
    Section 6.1). length (...) |Y| with EOS counted -> (...) float. alpha = 0 turns it off (lp = 1), and
    lp(1) = 1 for every alpha."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def max_lengths(src: Tensor, pad: int, max_len_a: float, max_len_b: int) -> Tensor:
    """src (batch, src_len) -> (batch,) long: each sentence's output limit, EOS included,
    floor(a * non-pad source tokens + b), at least 1."""
    n = src.ne(pad).sum(1)
    return (max_len_a * n.double() + max_len_b).floor().long().clamp(min=1)


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (rows, vocab) -> the same with every token outside the top k and outside the top-p nucleus
    set to -inf. top_k = 0 and top_p = 1 turn the filters off.

    The nucleus (Holtzman et al., 2020) is the smallest set of most likely tokens whose probability mass
    reaches top_p: a token stays when the mass of the tokens ranked above it is still below top_p, so the
    most likely token always stays. Ties at the k-th logit are all kept.
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # mass strictly above each token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def sample_categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """logits (rows, vocab), -inf allowed -> (rows,) long, token i drawn with probability softmax(logits)_i.

    The Gumbel-max trick (argmax of logits + Gumbel noise, the noise as -log of Exp(1) draws): unlike
    `torch.multinomial`, it validates nothing on the host, so it does not synchronise. `generator` must live on
    the logits' device."""
    noise = torch.empty_like(logits).exponential_(generator=generator)
    # exponential_ may return 0 in float32; -log(0) = inf would turn a -inf logit into nan.
    noise = noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (logits - noise.log()).argmax(-1)


def _constrain_(lprobs: Tensor, length: int, limit: Tensor, *, eos: int, pad: int, min_len: int,
                shortest_limit: int = 0) -> Tensor:
    """lprobs (rows, vocab): log-probs of the `length`-th output token; limit (rows,) -> lprobs, modified in
    place (a search step's largest tensor, not worth a copy), with PAD forbidden, EOS forbidden while
    length < min_len, and nothing but EOS where length >= limit (the limit wins). The forced EOS keeps its
    own log-probability, so scores stay the model's. shortest_limit: a lower bound of `limit`, read once per
    search; below it no row has reached its limit and the pass over lprobs that enforces it, a row-masked fill
    that costs a CPU more than the step's log-softmax, is skipped."""
    eos_lp = lprobs[:, eos].clone()
    if length >= shortest_limit:
        lprobs.masked_fill_((length >= limit).unsqueeze(1), -torch.inf)
    lprobs[:, pad] = -torch.inf
    lprobs[:, eos] = eos_lp if length >= min_len else eos_lp.masked_fill(length < limit, -torch.inf)
    return lprobs


def _force_(lprobs: Tensor, forced: Tensor, pad: int) -> Tensor:
    """lprobs (rows, vocab); forced (rows,) long, the token each row must take, pad where it is free ->
    lprobs, modified in place: a forced row keeps its forced token's log-probability and -inf elsewhere."""
    free = forced.eq(pad).unsqueeze(1)
    index = forced.unsqueeze(1)
    forced_lp = lprobs.gather(1, index)
    lprobs.masked_fill_(~free, -torch.inf)
    lprobs.scatter_(1, index, torch.where(free, lprobs.gather(1, index), forced_lp))
    return lprobs


def _limits(model, src: Tensor, prefix: Tensor | None, pad: int, max_len_a: float, max_len_b: int) -> Tensor:
    """`max_lengths`, raised where a prefix needs more (its tokens and an EOS), then capped at the target
    tokens the model has positions for (`target_room`, as fairseq caps at its decoder's max positions),
    so that a search never runs past a learned position table. -> (batch,) long."""
    limit = max_lengths(src, pad, max_len_a, max_len_b)
    if prefix is not None:
        limit = torch.maximum(limit, prefix.ne(pad).sum(1) + 1)
    room = getattr(model, "target_room", lambda src: None)(src)  # test stubs and exported models have none
    return limit if room is None else limit.clamp(max=max(room, 1))


def _limit_range(limit: Tensor) -> tuple[int, int]:
    """limit (B,) -> (its min, its max) as ints, in one host read; (0, 0) for an empty batch."""
    if not limit.numel():
        return 0, 0
    lo, hi = torch.aminmax(limit)
    return tuple(torch.stack([lo, hi]).tolist())


@functools.lru_cache(maxsize=None)
def _block_length(n: int, k: int) -> int | None:
    """A divisor of n near sqrt(n), leaving more than 4k blocks; None if n has none."""
    fits = [d for d in range(8, math.isqrt(n) * 4 + 1) if n % d == 0 and n // d > 4 * k]
    return min(fits, key=lambda d: abs(d - math.isqrt(n))) if fits else None


def _top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=1) for x (rows, n): the k largest per row, best first, and their indices, each (rows, k).

    On a CPU, topk over the K * vocab candidates of a sentence costs about a nanosecond per element, the search
    step's largest cost after the model. Cut each row into blocks: the k largest elements lie in the k blocks
    with the largest maxima (a block outside them is beaten by k block maxima, so any of its elements by k
    elements), so a topk over those blocks alone gives the same answer, at about a quarter of the cost
    (docs/performance.md). Ties may be broken differently from a single topk, which promises no order among
    them either.
    """
    rows, n = x.shape
    block = _block_length(n, k) if x.device.type == "cpu" else None
    if block is None:
        return x.topk(k, dim=1)
    best_blocks = x.view(rows, n // block, block).amax(dim=2).topk(k, dim=1).indices  # (rows, k)
    index = (best_blocks.unsqueeze(2) * block + torch.arange(block, device=x.device)).view(rows, k * block)
    values, at = x.gather(1, index).topk(k, dim=1)
    return values, index.gather(1, at)


def _sync_period(device: torch.device, sync_every: int | None) -> int:
    """Steps between the search's host reads: `sync_every`, or by default 1 on the CPU and 8 elsewhere."""
    if sync_every is None:
        return 1 if device.type == "cpu" else 8
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    return sync_every


def _rows_where(mask: Tensor, count: int) -> Tensor:
    """mask (rows,) bool with `count` True entries (already read on the host) -> (count,) long, their indices
    in order. A stable sort instead of `nonzero`, whose output size needs a host synchronisation."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def _fill_holes(alive: Tensor, count: int) -> Tensor:
    """alive (rows,) bool with `count` True entries (already read on the host) -> (count,) long: their indices,
    those below `count` left in place and the others moved into the places below `count` that are not alive,
    in order. Pruning by it leaves most rows where they were, so `state.select` copies only the few that move
    (a compaction in order would shift every row after the first one pruned)."""
    head, tail = alive[:count], alive[count:]
    holes_first = _rows_where(~head, count)  # (count,) the places not alive, then the rest
    tail_first = _rows_where(tail, tail.numel()) + count  # the rows alive beyond count, then the rest
    m = min(count, tail.numel())  # at least the number of holes (each hole has a row from the tail to fill it)
    filling = torch.where(torch.arange(m, device=alive.device) < (~head).sum(), tail_first[:m], holes_first[:m])
    return torch.arange(count, device=alive.device).scatter_(0, holes_first[:m], filling)


def _stay_with_parents(parent: Tensor) -> Tensor:
    """parent (n, K): the beam each of a sentence's K new hypotheses extends -> order (n, K), a permutation: new
    beam j is hypothesis order[:, j]. Each parent's first child takes its parent's beam, the other children
    the beams no child extends, in order. The search ranks by score, not by beam, so the order changes no
    result; but a child in its parent's beam needs no copy of the parent's caches (`state.select` moves only
    the rows that change)."""
    n, K = parent.shape
    earlier = torch.ones(K, K, dtype=torch.bool, device=parent.device).tril(-1)  # [j, i]: i before j
    first = ~((parent.unsqueeze(2) == parent.unsqueeze(1)) & earlier).any(2)  # (n, K) no earlier sibling
    extended = torch.zeros_like(first).scatter_(1, parent, True)  # (n, K) beams some child extends
    free = torch.argsort(extended.to(torch.uint8), dim=1, stable=True)  # beams no child extends, first
    rank = (~first).long().cumsum(1).sub_(1).clamp_(min=0)  # an extra child's rank among the extra ones
    beam = torch.where(first, parent, free.gather(1, rank))  # (n, K) the beam each hypothesis takes
    return torch.empty_like(parent).scatter_(1, beam, torch.arange(K, device=parent.device).expand(n, K))


# ---- ensembles


@dataclass
class EnsembleState:
    """The decoder states of an ensemble's models, one per model, selected together."""

    states: list

    def select(self, index: Tensor, sentences: Tensor | None = None, group: int | None = None) -> "EnsembleState":
        return EnsembleState([state.select(index, sentences, group) for state in self.states])


class Ensemble:
    """Several models that decode as one, through the same three calls as a single model. Each step's
    log-probabilities are the mean of the models' (a log-linear combination, as Marian's ensembles are);
    the search renormalises them. The models must share the target vocabulary."""

    def __init__(self, models: list):
        self.models = models

    def start_decoding(self, src: Tensor, max_len: int | None = None, beam_size: int = 1) -> EnsembleState:
        return EnsembleState([m.start_decoding(src, max_len, beam_size) for m in self.models])

    def target_room(self, src: Tensor) -> int | None:
        """The fewest target tokens any model has positions for (None: no limit)."""
        rooms = [room for m in self.models if (room := m.target_room(src)) is not None]
        return min(rooms, default=None)

    def decode_step(self, tokens: Tensor, state: EnsembleState) -> Tensor:
        """tokens (B,) -> (B, V) float32, the mean of the models' log-probabilities."""
        lprobs = [F.log_softmax(m.decode_step(tokens, s).float(), dim=-1) for m, s in zip(self.models, state.states)]
        return torch.stack(lprobs).mean(0)


# ---- greedy search and sampling


def _one_token_at_a_time(model, src: Tensor, choose, *, bos: int, eos: int, pad: int, max_len_a: float,
                         max_len_b: int, min_len: int, sync_every: int | None,
                         prefix: Tensor | None) -> SearchOutput:
    """The loop shared by greedy search and sampling. choose(lprobs (rows, vocab)) -> tokens (rows,).
    Rows that emitted EOS leave the batch (`state.select`) at the next host read; the loop ends when none is
    left."""
    B, device = src.size(0), src.device
    limit = _limits(model, src, prefix, pad, max_len_a, max_len_b)  # (B,)
    shortest, steps = _limit_range(limit)  # one read before the loop; steps: the buffers' width
    state = model.start_decoding(src, steps)
    tokens = torch.full((B, steps), pad, dtype=torch.long, device=device)
    scores = torch.zeros(B, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    period = _sync_period(device, sync_every)
    rows = torch.arange(B, device=device)  # (rows,) the sentence each row decodes
    live = torch.ones(B, dtype=torch.bool, device=device)  # (rows,) False once the row has emitted EOS
    prev = torch.full((B,), bos, dtype=torch.long, device=device)
    for t in range(steps):
        row_limit = limit[rows]
        logits = model.decode_step(prev, state)
        lprobs = _constrain_(F.log_softmax(logits.float(), dim=-1), t + 1, row_limit, eos=eos, pad=pad,
                             min_len=min_len, shortest_limit=shortest)
        if prefix is not None and t < prefix.size(1):
            lprobs = _force_(lprobs, prefix[rows, t], pad)
        # Forced even where the model gives EOS probability zero, so that every output ends in EOS. A row that
        # has ended (still in the batch until the next read) emits only padding, scored 0.
        token = choose(lprobs).masked_fill(t + 1 >= row_limit, eos).masked_fill(~live, pad)
        tokens[rows, t] = token
        scores.index_add_(0, rows, lprobs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(~live, 0.0))
        lengths.index_add_(0, rows, live.long())
        live = live & token.ne(eos)
        prev = token
        if (t + 1) % period == 0:
            n_alive = int(live.sum())  # the host read
            if n_alive == 0:
                break
            if n_alive < rows.numel():
                keep = _fill_holes(live, n_alive)
                state, rows, prev, live = state.select(keep), rows[keep], prev[keep], live[keep]
    width = int(lengths.max()) if B else 0
    return SearchOutput(tokens[:, None, :width], scores[:, None], lengths[:, None])


@torch.inference_mode()
def greedy_search(model, src: Tensor, *, bos: int, eos: int, pad: int, max_len_a: float = 1.0,
                  max_len_b: int = 50, min_len: int = 0, sync_every: int | None = None,
                  prefix: Tensor | None = None) -> SearchOutput:
    """The most likely token at every step. src (batch, src_len) long, padded with pad; prefix (batch,
    prefix_len) or None -> SearchOutput with nbest = 1, scored by the sum of log-probs."""
    return _one_token_at_a_time(model, src, lambda lprobs: lprobs.argmax(-1), bos=bos, eos=eos, pad=pad,
                                max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len, sync_every=sync_every,
                                prefix=prefix)


@torch.inference_mode()
def sample(model, src: Tensor, *, bos: int, eos: int, pad: int, max_len_a: float = 1.0, max_len_b: int = 50,
           min_len: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, sync_every: int | None = None,
           prefix: Tensor | None = None) -> SearchOutput:
    """Ancestral sampling from softmax(log p / temperature), restricted to the top k tokens and the top-p
    nucleus (for back-translation, Edunov et al., 2018). src (batch, src_len) -> SearchOutput with nbest = 1,
    scored by the sum of the model's untempered, unfiltered log-probs of the sampled tokens. `generator`, on
    src's device, makes the draws reproducible; None uses the global generator."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy_search for argmax), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")

    def choose(lprobs: Tensor) -> Tensor:
        return sample_categorical(top_k_top_p_filter(lprobs / temperature, top_k, top_p), generator)

    return _one_token_at_a_time(model, src, choose, bos=bos, eos=eos, pad=pad, max_len_a=max_len_a,
                                max_len_b=max_len_b, min_len=min_len, sync_every=sync_every, prefix=prefix)


# ---- beam search


@torch.inference_mode()
def beam_search(model, src: Tensor, *, bos: int, eos: int, pad: int, beam_size: int = 4,
                alpha: float = 0.6, nbest: int = 1, max_len_a: float = 1.0, max_len_b: int = 50,
                min_len: int = 0, sync_every: int | None = None, early_stop: bool = False,
                prefix: Tensor | None = None) -> SearchOutput:
    """Beam search (Section 6.1: beam 4, alpha 0.6) over all sentences and beams at once.
    src (batch, src_len) long, padded with pad -> SearchOutput with `nbest` (<= beam_size) hypotheses each.

    Each sentence keeps K = beam_size live hypotheses and a list of its K best finished ones. At every step
    the K * vocab extensions of its live hypotheses are ranked by summed log-prob and the best 2K kept
    (fairseq, tensor2tensor): an EOS extension ranked within the top K finishes, scored
    log P(Y) / lp(|Y|) with lp = `length_penalty(|Y|, alpha)`, and joins the finished list (the best K
    stay); the best K extensions that are not EOS become the live hypotheses, so a finished one never
    occupies a beam.
    With K = 1 and alpha = 0 this is greedy search.

    A sentence is done when no live hypothesis can still beat its nbest-th best finished one. Log-probs are
    <= 0, so a live hypothesis of summed log-prob s can at best end with score s / lp(L) for the most
    favourable length L it may still reach: s / max(lp(t + 2), lp(limit)) after step t (tensor2tensor's
    bound). Stopping then never changes the result, unlike fairseq's "K finished" rule, which can miss a
    longer hypothesis that the length penalty would have preferred. A done sentence leaves the batch
    (`state.select`) at the next host read, so late steps run on fewer rows; until then it adds no finished
    hypothesis. The search ends when every sentence is done. `early_stop` also ends a sentence as soon as the
    best of its step's candidates is EOS (and nbest are finished), as OpenNMT and CTranslate2 do: fewer steps,
    not always the best output.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"need 1 <= nbest <= beam_size, got nbest={nbest}, beam_size={beam_size}")
    K = beam_size
    B, device = src.size(0), src.device
    limit = _limits(model, src, prefix, pad, max_len_a, max_len_b)  # (B,)
    shortest, steps = _limit_range(limit)  # one read before the loop; steps: the buffers' width
    lp = length_penalty(torch.arange(steps + 2, device=device), alpha)  # (steps + 2,) lp of each length
    lp_limit = lp[limit]  # (B,)
    # One row per sentence for the first step, whose K beams would all start from BOS; then `select` widens
    # the state to K rows per sentence: rows g*K .. g*K+K-1 decode sentence g.
    state = model.start_decoding(src, steps, beam_size=1)

    # The finished hypotheses of every sentence, best first; a slot not yet filled scores -inf.
    fin_tokens = torch.full((B, K, steps), pad, dtype=torch.long, device=device)
    fin_scores = torch.full((B, K), -torch.inf, device=device)
    fin_lengths = torch.zeros((B, K), dtype=torch.long, device=device)

    # The live hypotheses of the n sentences not yet done: rows g*K .. g*K+K-1 of the batch belong to sent[g].
    sent = torch.arange(B, device=device)  # (n,)
    live_tokens = torch.zeros((B * K, 0), dtype=torch.long, device=device)  # (n*K, t)
    # The K rows start identical: only the first is live, or the beam would fill with K copies of one prefix.
    live_scores = torch.full((B, K), -torch.inf, device=device)  # (n, K) summed log-probs
    live_scores[:, 0] = 0.0
    prev = torch.full((B,), bos, dtype=torch.long, device=device)  # (n*K,), (n,) at the first step
    period = _sync_period(device, sync_every)
    ended = torch.zeros(B, dtype=torch.bool, device=device)  # (n,) done at an earlier step, not yet pruned
    for t in range(steps):
        n = sent.numel()
        row_limit = limit[sent]  # (n,)
        logits = model.decode_step(prev, state)  # (n*K, V)
        if t == 0:  # a sentence's one row stands for its K beams (of which only the first is live)
            logits = logits.repeat_interleave(K, dim=0)
        V = logits.size(-1)
        lprobs = _constrain_(F.log_softmax(logits.float(), dim=-1), t + 1, row_limit.repeat_interleave(K),
                             eos=eos, pad=pad, min_len=min_len, shortest_limit=shortest)
        if prefix is not None and t < prefix.size(1):
            lprobs = _force_(lprobs, prefix[sent, t].repeat_interleave(K), pad)
        cand = lprobs.view(n, K, V).add_(live_scores.unsqueeze(2)).view(n, K * V)  # in place, as above
        cand_scores, cand_index = _top_k(cand, min(2 * K, K * V))  # (n, C), best first
        C = cand_scores.size(1)
        cand_token = cand_index % V
        cand_rows = torch.arange(n, device=device).unsqueeze(1) * K + cand_index // V  # (n, C) parent rows
        hist = torch.cat([live_tokens[cand_rows.flatten()].view(n, C, t), cand_token.unsqueeze(2)], dim=2)

        # Finish: EOS among the top K candidates, merged into the sentence's finished list.
        finishing = cand_token[:, :K].eq(eos) & cand_scores[:, :K].isfinite() & ~ended.unsqueeze(1)  # (n, K)
        new_scores = (cand_scores[:, :K] / lp[t + 1]).masked_fill(~finishing, -torch.inf)
        merged_scores = torch.cat([fin_scores[sent], new_scores], dim=1)  # (n, 2K)
        # Finished hypotheses so far have at most t tokens, so the first t + 1 columns hold all of them.
        merged_tokens = torch.cat([fin_tokens[sent, :, :t + 1],
                                   hist[:, :K].masked_fill(~finishing.unsqueeze(2), pad)], dim=1)
        merged_lengths = torch.cat([fin_lengths[sent], finishing.long() * (t + 1)], dim=1)
        top = merged_scores.topk(K, dim=1).indices  # (n, K), best first
        # A sentence already done keeps its list exactly (topk may swap equal scores).
        top = torch.where(ended.unsqueeze(1), torch.arange(K, device=device), top)
        top_scores = merged_scores.gather(1, top)
        fin_scores[sent] = top_scores
        fin_tokens[sent, :, :t + 1] = merged_tokens.gather(1, top.unsqueeze(2).expand(-1, -1, t + 1))
        fin_lengths[sent] = merged_lengths.gather(1, top)

        # Continue: the best K candidates that are not EOS refill the beam.
        live_scores, pick = cand_scores.masked_fill(cand_token.eq(eos), -torch.inf).topk(K, dim=1)  # (n, K)
        order = _stay_with_parents(cand_index.gather(1, pick) // V)  # children in their parents' beams
        live_scores, pick = live_scores.gather(1, order), pick.gather(1, order)
        rows = cand_rows.gather(1, pick).flatten()  # (n*K,)
        prev = cand_token.gather(1, pick).flatten()
        live_tokens = hist.gather(1, pick.unsqueeze(2).expand(-1, -1, t + 1)).view(n * K, t + 1)

        # Done: the best any live hypothesis can still reach is no better than the nbest-th finished one, so
        # the nbest outputs can no longer change (the finished ones below them might, but are not returned).
        # At the limit every live score is -inf (only EOS was allowed), so every sentence is done by then.
        bound = live_scores.max(1).values / torch.maximum(lp[t + 2], lp_limit[sent])  # (n,)
        ended = ended | (bound <= top_scores[:, nbest - 1])
        if early_stop:  # OpenNMT's and CTranslate2's rule, not exact: done once the step's best candidate is EOS
            ended = ended | (finishing[:, 0] & top_scores[:, nbest - 1].isfinite())
        keep = None  # every sentence stays: the state reorders beams within sentences, memory untouched
        if (t + 1) % period == 0:
            n_done = int(ended.sum())  # the host read
            if n_done == n:
                break
            if n_done:
                keep = _fill_holes(~ended, n - n_done)  # (n',)
                keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).flatten()  # (n'*K,)
                sent, live_scores, ended = sent[keep], live_scores[keep], ended[keep]
                rows, prev, live_tokens = rows[keep_rows], prev[keep_rows], live_tokens[keep_rows]
        state = state.select(rows // K if t == 0 else rows, keep, group=K)  # (parents: rows of n*K, or of n)

    lengths = fin_lengths[:, :nbest]
    width = int(lengths.max()) if B else 0
    return SearchOutput(fin_tokens[:, :nbest, :width].contiguous(), fin_scores[:, :nbest].contiguous(),
                        lengths.contiguous())
