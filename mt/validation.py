"""Validation during training: dev loss and perplexity under teacher forcing, and dev BLEU from greedy search.

The dev references are the raw text of `data.valid`, so the BLEU is sacreBLEU's on detokenized output, as at
test time (greedy, so a little below the beam search's).
"""

from __future__ import annotations

import math

import sacrebleu
import torch

from mt.config import Config
from mt.data import EOS, PAD, PreparedData, collate, make_batches, read_corpus
from mt.loss import label_smoothed_loss
from mt.model import Transformer
from mt.runtime import autocast, decode_batch_tokens
from mt.search import greedy_search


@torch.no_grad()
def validate(model: Transformer, data: PreparedData, cfg: Config, precision: str, device: torch.device) -> dict:
    """Dev loss, NLL and perplexity per target token, and with `train.valid_bleu` the dev BLEU; {} without
    a dev set. Puts the model in eval mode."""
    valid = data.valid
    if valid is None:
        return {}
    model.eval()
    sums = torch.zeros(2, device=device)  # (loss, nll), read once at the end
    tokens = 0
    for indices in make_batches(valid.src_lens, valid.tgt_lens, cfg.data.max_tokens, 0, 0, shuffle=False):
        batch = collate(valid, indices)
        tokens += batch.n_tgt_tokens  # on the host, before the batch moves
        batch = batch.to(device)
        with autocast(precision, device):
            logits = model(batch.src, batch.tgt_in)
        sums += torch.stack(label_smoothed_loss(logits.flatten(0, 1), batch.tgt_out.flatten(),
                                                cfg.train.label_smoothing,
                                                exclude_pad=cfg.train.smoothing_excludes_pad))
    loss_sum, nll_sum = sums.tolist()
    result = {"valid_loss": loss_sum / tokens, "valid_nll": nll_sum / tokens,
              "valid_ppl": math.exp(min(nll_sum / tokens, 50.0))}
    if cfg.train.valid_bleu:
        result["valid_bleu"] = dev_bleu(model, data, cfg, precision, device)
    return result


@torch.no_grad()
def dev_bleu(model: Transformer, data: PreparedData, cfg: Config, precision: str, device: torch.device) -> float:
    """Greedy-decode the dev sources and score them against the raw references with sacreBLEU."""
    valid, vocab, decode = data.valid, data.vocab, cfg.decode
    refs = [tgt for _, tgt in read_corpus(cfg.data.valid, cfg.data.src_lang, cfg.data.tgt_lang)]
    hyps = [""] * len(valid)
    no_targets = valid.tgt_lens * 0  # batches by source length alone
    for indices in make_batches(valid.src_lens, no_targets, decode_batch_tokens(decode.max_tokens, device), 0, 0,
                                shuffle=False):
        batch = collate(valid, indices).to(device)
        with autocast(precision, device):
            out = greedy_search(model, batch.src, bos=vocab.tgt.bos_id(), eos=EOS, pad=PAD,
                                max_len_a=decode.max_len_a, max_len_b=decode.max_len_b)
        for i, ids in zip(indices.tolist(), out.tokens[:, 0].tolist()):
            hyps[i] = vocab.tgt.decode([t for t in ids if t not in (PAD, EOS)])
    return sacrebleu.corpus_bleu(hyps, [refs]).score
