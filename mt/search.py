"""Search over the model's incremental decoder: greedy, beam (Section 6.1) and sampling.

Every search talks to the model through three calls only, so tests can drive it with a stub decoder:

    state = model.start_decoding(src, max_len)     encode once
    logits = model.decode_step(tokens, state)      one position for every row, caches updated in place
    state = state.select(index)                    expand / reorder / prune rows

The one Python loop is over time steps; sentences and beams are handled as tensor rows. Each step makes one
small host read (how many sentences are done) to stop early and drop finished sentences from the batch.

Lengths count output tokens including the final EOS: for the maximum length, for `min_len` and for the
length penalty (as fairseq does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SearchOutput:
    tokens: Tensor  # (B, nbest, L) long, without BOS, ending in EOS where finished, padded with pad
    scores: Tensor  # (B, nbest) float: the ranking score (length-normalised for beam search)
    lengths: Tensor  # (B, nbest) long: output tokens including EOS


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016); alpha = 0 turns it off."""
    return ((5.0 + length.float()) / 6.0) ** alpha


_lp = length_penalty  # beam_search's `length_penalty` argument (alpha) shadows the function's name


def max_lengths(src: Tensor, pad: int, max_len_a: float, max_len_b: int) -> Tensor:
    """(B,) per-sentence output limit: a * (non-pad source tokens) + b, at least 1."""
    n = src.ne(pad).sum(1)
    return (max_len_a * n.float() + max_len_b).long().clamp(min=1)


def _constrain(lprobs: Tensor, step: int, limit: Tensor, eos: int, min_len: int) -> Tensor:
    """Before `min_len` output tokens (EOS included) forbid EOS; at the row's length limit allow nothing
    but EOS, which keeps its own log-probability so scores stay the model's. The limit wins over min_len.
    lprobs (R, V), limit (R,)."""
    at_limit = (step + 1 >= limit).unsqueeze(1)
    is_eos = torch.zeros(lprobs.size(-1), dtype=torch.bool, device=lprobs.device)
    is_eos[eos] = True
    if step + 1 < min_len:
        lprobs = lprobs.masked_fill(is_eos & ~at_limit, -torch.inf)
    return lprobs.masked_fill(at_limit & ~is_eos, -torch.inf)


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (R, V) -> the same with everything outside the top k and the top-p nucleus set to -inf.

    The nucleus (Holtzman et al., 2020) is the smallest set of most likely tokens whose mass reaches top_p.
    """
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


@torch.inference_mode()
def _sequential(model, src: Tensor, *, bos: int, eos: int, pad: int, max_len_a: float, max_len_b: int,
                min_len: int, choose) -> SearchOutput:
    """Shared loop of greedy search and sampling: `choose(lprobs) -> tokens (R,)`."""
    B, device = src.size(0), src.device
    limit = max_lengths(src, pad, max_len_a, max_len_b)
    steps = int(limit.max())
    state = model.start_decoding(src, steps + 1)
    out = torch.full((B, steps), pad, dtype=torch.long, device=device)
    scores = torch.zeros(B, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original sentence of each live row
    prev = torch.full((B,), bos, dtype=torch.long, device=device)
    for t in range(steps):
        lprobs = F.log_softmax(model.decode_step(prev, state).float(), dim=-1)
        lprobs = _constrain(lprobs, t, limit[rows], eos, min_len)
        token = choose(lprobs)
        out[rows, t] = token
        scores[rows] += lprobs.gather(1, token.unsqueeze(1)).squeeze(1)
        finished = token.eq(eos)
        lengths[rows] = t + 1
        alive = ~finished
        n_alive = int(alive.sum())  # the step's one host read
        if n_alive == 0:
            break
        if n_alive < len(rows):
            keep = alive.nonzero().squeeze(1)
            state, rows, token = state.select(keep), rows[keep], token[keep]
        prev = token
    width = int(lengths.max())
    return SearchOutput(out[:, :width].unsqueeze(1), scores.unsqueeze(1), lengths.unsqueeze(1))


def greedy_search(model, src: Tensor, *, bos: int, eos: int, pad: int, max_len_a: float = 1.0,
                  max_len_b: int = 50, min_len: int = 0) -> SearchOutput:
    """The most likely token at every step. src (B, S) -> SearchOutput with nbest 1 (score: sum of log-probs)."""
    return _sequential(model, src, bos=bos, eos=eos, pad=pad, max_len_a=max_len_a, max_len_b=max_len_b,
                       min_len=min_len, choose=lambda lp: lp.argmax(-1))


def sample(model, src: Tensor, *, bos: int, eos: int, pad: int, max_len_a: float = 1.0, max_len_b: int = 50,
           min_len: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> SearchOutput:
    """Ancestral sampling with temperature, top-k and top-p (for back-translation: Edunov et al., 2018).
    The score is the sum of the model's (untempered) log-probs of the sampled tokens."""
    def choose(lprobs: Tensor) -> Tensor:
        filtered = top_k_top_p_filter(lprobs / temperature, top_k, top_p)
        return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)

    return _sequential(model, src, bos=bos, eos=eos, pad=pad, max_len_a=max_len_a, max_len_b=max_len_b,
                       min_len=min_len, choose=choose)


@torch.inference_mode()
def beam_search(model, src: Tensor, *, bos: int, eos: int, pad: int, beam_size: int = 4,
                length_penalty: float = 0.6, nbest: int = 1,
                max_len_a: float = 1.0, max_len_b: int = 50, min_len: int = 0) -> SearchOutput:
    """Beam search over all sentences and beams at once. src (B, S) -> SearchOutput with `nbest` hypotheses.

    Each step scores every (beam, token) extension of a sentence's K live hypotheses and takes the best 2K
    candidates: those ending in EOS among the top K join the sentence's finished list, scored
    log P(Y) / lp(|Y|); the best K others stay live. A sentence is done once it holds K finished hypotheses
    (fairseq's rule) or its live ones reach the length limit; done sentences leave the batch, and the search
    stops when all are done. `length_penalty` is the GNMT alpha (0.6 in the paper).
    """
    alpha = length_penalty
    K, B, device = beam_size, src.size(0), src.device
    limit = max_lengths(src, pad, max_len_a, max_len_b)  # (B,)
    steps = int(limit.max())
    state = model.start_decoding(src, steps + 1).select(torch.arange(B, device=device).repeat_interleave(K))

    # Finished hypotheses, per original sentence.
    fin_tokens = torch.full((B, K, steps), pad, dtype=torch.long, device=device)
    fin_scores = torch.full((B, K), -torch.inf, device=device)
    fin_lengths = torch.zeros((B, K), dtype=torch.long, device=device)
    fin_count = torch.zeros(B, dtype=torch.long, device=device)

    sent = torch.arange(B, device=device)  # original index of each live sentence
    live_tokens = torch.full((B * K, steps), pad, dtype=torch.long, device=device)
    # Only the first beam of each sentence is live at the start: the K copies are identical.
    live_scores = torch.full((B, K), -torch.inf, device=device)
    live_scores[:, 0] = 0.0
    prev = torch.full((B * K,), bos, dtype=torch.long, device=device)
    for t in range(steps):
        n = sent.numel()
        lprobs = F.log_softmax(model.decode_step(prev, state).float(), dim=-1)  # (n*K, V)
        V = lprobs.size(-1)
        lprobs = _constrain(lprobs, t, limit[sent].repeat_interleave(K), eos, min_len)
        cand = (live_scores.unsqueeze(2) + lprobs.view(n, K, V)).view(n, K * V)
        cand_scores, cand_index = cand.topk(min(2 * K, K * V), dim=1)  # (n, 2K)
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_rows = (torch.arange(n, device=device).unsqueeze(1) * K + cand_beam)  # rows in the live batch
        is_eos = cand_token.eq(eos) & cand_scores.isfinite()

        # Finish: EOS candidates ranked within the top K, merged with the sentence's finished list.
        new_fin = is_eos.clone()
        new_fin[:, K:] = False
        norm = cand_scores / _lp(torch.tensor(t + 1, device=device), alpha)
        norm = norm.masked_fill(~new_fin, -torch.inf)
        hist = live_tokens[cand_rows.flatten()].view(n, -1, steps).clone()  # (n, 2K, steps)
        hist[:, :, t] = cand_token
        merged_scores = torch.cat([fin_scores[sent], norm], dim=1)  # (n, K + 2K)
        merged_tokens = torch.cat([fin_tokens[sent], hist], dim=1)
        merged_lengths = torch.cat([fin_lengths[sent], torch.full_like(cand_token, t + 1)], dim=1)
        best_scores, best = merged_scores.topk(K, dim=1)
        fin_scores[sent] = best_scores
        fin_tokens[sent] = merged_tokens.gather(1, best.unsqueeze(2).expand(-1, -1, steps))
        fin_lengths[sent] = merged_lengths.gather(1, best)
        fin_count[sent] += new_fin.sum(1)

        # Continue: the best K non-EOS candidates.
        cont_scores = cand_scores.masked_fill(cand_token.eq(eos), -torch.inf)
        live_scores, pick = cont_scores.topk(K, dim=1)  # (n, K)
        rows = cand_rows.gather(1, pick).flatten()
        prev = cand_token.gather(1, pick).flatten()
        live_tokens = hist.gather(1, pick.unsqueeze(2).expand(-1, -1, steps)).view(n * K, steps)

        done = (fin_count[sent] >= K) | ~live_scores.isfinite().any(1) | (t + 1 >= limit[sent])
        n_done = int(done.sum())  # the step's one host read
        if n_done == n:
            break
        if n_done:
            keep = (~done).nonzero().squeeze(1)
            rows = rows.view(n, K)[keep].flatten()
            prev = prev.view(n, K)[keep].flatten()
            live_tokens = live_tokens.view(n, K, steps)[keep].view(-1, steps)
            live_scores, sent = live_scores[keep], sent[keep]
        state = state.select(rows)

    order = fin_scores.argsort(dim=1, descending=True)[:, :nbest]
    lengths = fin_lengths.gather(1, order)
    width = max(int(lengths.max()), 1)
    tokens = fin_tokens.gather(1, order.unsqueeze(2).expand(-1, -1, steps))[:, :, :width]
    return SearchOutput(tokens, fin_scores.gather(1, order), lengths)
