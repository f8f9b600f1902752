"""The Transformer: masking, equivalence with PyTorch's own layers, incremental decoding, tying, positions,
initialisation, activation checkpointing and the FLOP count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import mt.model
from mt.config import ModelConfig
from mt.model import Transformer, padding_mask, sinusoids

PAD, BOS, EOS, V = 0, 2, 3, 50
D, H, FF = 32, 2, 64
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, after a few layers of float reordering (SDPA vs explicit softmax)


def tiny(norm: str = "post", share: bool = True, **kw) -> Transformer:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    cfg = ModelConfig(d_model=D, n_heads=H, n_layers=2, d_ff=FF, norm=norm, **kw)
    return Transformer(cfg, V, V, pad_id=PAD, share_all_embeddings=share).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """src (3, 7) and tgt_in (3, 6), each with rows padded at the end, as the data pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (3, 7), generator=g)
    src[1, 4:] = PAD
    src[2, 6:] = PAD
    tgt = torch.randint(4, V, (3, 6), generator=g)
    tgt[:, 0] = BOS
    tgt[2, 4:] = PAD
    return src, tgt


def pad_right(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, torch.full((x.size(0), n), PAD)], dim=1)


# ---- 1, 2: masking


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_never_changes_outputs_at_real_positions(norm):
    model = tiny(norm)
    src, tgt = batch()
    out = model(src, tgt)
    # The same batch with 5 more source and 4 more target padding columns.
    assert_close(model(pad_right(src, 5), pad_right(tgt, 4))[:, :6], out, **TOL)
    # Row 1 alone, without any padding, equals its padded copy in the batch.
    assert_close(model(src[1:2, :4], tgt[1:2]), out[1:2], **TOL)
    # Row 2's real target positions (0..3) alone.
    assert_close(model(src[2:3, :6], tgt[2:3, :4]), out[2:3, :4], **TOL)


def test_future_target_tokens_never_change_past_outputs():
    model = tiny()
    src, tgt = batch()
    out = model(src, tgt)
    for t in range(1, 6):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % (V - 4) + 4
        out2 = model(src, changed)
        assert_close(out2[:, :t], out[:, :t], **TOL)
        assert not torch.allclose(out2[:, t], out[:, t])  # the change does reach position t


# ---- 3: equivalence with PyTorch's own layers


def _copy_attention(ref: nn.MultiheadAttention, ours: mt.model.MultiHeadAttention) -> None:
    with torch.no_grad():
        if ours.cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv_proj.weight)
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())


def _randomise_norms_and_biases(module: nn.Module) -> None:
    """Init leaves biases 0 and LayerNorm gains 1: random ones make a swapped or skipped one visible."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_encoder_layer_equals_pytorch_transformer_encoder_layer(norm):
    ours = tiny(norm).encoder[0]
    _randomise_norms_and_biases(ours)
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation="relu", batch_first=True,
                                     norm_first=norm == "pre").eval()
    _copy_attention(ref.self_attn, ours.self_attn)
    ref.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    ref.norm1.load_state_dict(ours.res_attn.norm.state_dict())
    ref.norm2.load_state_dict(ours.res_ffn.norm.state_dict())
    torch.manual_seed(2)
    x = torch.randn(3, 7, D)
    pad = batch()[0].eq(PAD)
    # Parameters require grad, so PyTorch takes its reference path, not the nested-tensor fast path.
    expected = ref(x, src_key_padding_mask=pad)
    assert_close(ours(x, padding_mask(pad)), expected, **TOL)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoder_layer_equals_pytorch_transformer_decoder_layer(norm):
    ours = tiny(norm).decoder[0]
    _randomise_norms_and_biases(ours)
    ref = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, activation="relu", batch_first=True,
                                     norm_first=norm == "pre").eval()
    _copy_attention(ref.self_attn, ours.self_attn)
    _copy_attention(ref.multihead_attn, ours.cross_attn)
    ref.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    for i, res in enumerate((ours.res_self, ours.res_cross, ours.res_ffn), start=1):
        getattr(ref, f"norm{i}").load_state_dict(res.norm.state_dict())
    torch.manual_seed(2)
    x, memory = torch.randn(3, 6, D), torch.randn(3, 7, D)
    pad = batch()[0].eq(PAD)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=pad)
    assert_close(ours(x, memory, padding_mask(pad)), expected, **TOL)


# ---- 4: incremental decoding


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("max_len", [None, 2, 6])
def test_incremental_decoding_equals_the_full_forward_pass_at_every_position(norm, max_len):
    model = tiny(norm)
    src, tgt = batch()
    full = model(src, tgt)
    with torch.inference_mode():
        state = model.start_decoding(src, max_len)
        steps = [model.decode_step(tgt[:, t], state) for t in range(tgt.size(1))]
    assert state.step == tgt.size(1) and state.capacity >= tgt.size(1)  # max_len 2: the caches grew
    assert_close(torch.stack(steps, 1), full, **TOL)


def test_incremental_decoding_after_select_equals_forward_on_the_selected_rows():
    model = tiny("pre")
    src, tgt = batch()
    # Before step t, select with: expand 3 -> 6 rows as beam search does first; reorder and prune; expand
    # again, after the (capacity 3) caches have grown; prune to one row.
    schedule = {0: [0, 0, 1, 1, 2, 2], 2: [5, 0, 3, 1], 4: [2, 2, 0, 1, 3], 5: [3]}
    rows = torch.arange(3)  # the original row each state row decodes
    with torch.inference_mode():
        state = model.start_decoding(src, max_len=3)
        for t in range(tgt.size(1)):
            if t in schedule:
                index = torch.tensor(schedule[t])
                state, rows = state.select(index), rows[index]
            logits = model.decode_step(tgt[rows, t], state)
            assert_close(logits, model(src[rows], tgt[rows])[:, t], **TOL)
    assert state.memory.size(0) == state.src_pad.size(0) == state.cross_kv[0][0].size(0) == 1


def test_beam_groups_share_one_memory_row_and_reordering_within_them_copies_none_of_it():
    model = tiny("post")
    src, tgt = batch()
    K = 2
    # Steps before which the state is reordered within sentences (None) or pruned to some sentences.
    schedule = {1: ([1, 1, 3, 2, 4, 5], None), 3: ([0, 0, 5, 4], torch.tensor([0, 2])), 4: ([3, 2], torch.tensor([1]))}
    rows = torch.arange(3).repeat_interleave(K)  # the sentence each state row decodes
    with torch.inference_mode():
        state = model.start_decoding(src, max_len=2, beam_size=K)
        assert state.memory.size(0) == state.cross_kv[0][0].size(0) == 3 and state.self_kv[0][0].size(0) == 6
        for t in range(tgt.size(1)):
            if t in schedule:
                index, sentences = schedule[t]
                old, state, rows = state, state.select(torch.tensor(index), sentences), rows[index]
                if sentences is None:  # a reorder: the very same memory tensors, not copies
                    assert state.memory is old.memory and state.cross_kv[0][0] is old.cross_kv[0][0]
                assert state.memory.size(0) == state.cross_kv[1][1].size(0) == len(index) // K
            logits = model.decode_step(tgt[rows, t], state)
            assert_close(logits, model(src[rows], tgt[rows])[:, t], **TOL)


def test_a_state_of_one_row_per_sentence_widens_to_k_beams_sharing_its_memory():
    model = tiny("post")
    src, tgt = batch()
    K = 3
    with torch.inference_mode():
        state = model.start_decoding(src, max_len=2)  # one row per sentence, as beam search's first step
        assert state.group == 1 and state.self_kv[0][0].size(0) == 3
        model.decode_step(tgt[:, 0], state)
        wide = state.select(torch.arange(3).repeat_interleave(K), group=K)
        assert wide.group == K and wide.self_kv[0][0].size(0) == 3 * K
        assert wide.memory is state.memory and wide.cross_kv[0][0] is state.cross_kv[0][0]  # not copied
        # Beams of one sentence then part ways: each row is fed its own sentence's target, rows reordered.
        wide = wide.select(torch.tensor([2, 0, 1, 3, 3, 4, 8, 7, 6]))
        rows = torch.arange(3).repeat_interleave(K)
        for t in range(1, tgt.size(1)):
            logits = model.decode_step(tgt[rows, t], wide)
            assert_close(logits, model(src[rows], tgt[rows])[:, t], **TOL)


# ---- 5: weight tying, positional encodings


def test_joint_vocabulary_ties_all_three_matrices_and_separate_vocabularies_tie_target_and_output():
    joint = tiny(share=True)
    assert joint.src_embed.embed.weight is joint.tgt_embed.embed.weight is joint.output.weight
    assert isinstance(joint.output.weight, nn.Parameter)
    separate = tiny(share=False)
    assert separate.tgt_embed.embed.weight is separate.output.weight
    assert separate.src_embed.embed.weight is not separate.tgt_embed.embed.weight
    untied = tiny(share=False, tie_embeddings=False)
    assert untied.output.weight is not untied.tgt_embed.embed.weight
    joint_untied_output = tiny(share=True, tie_embeddings=False)  # a joint vocabulary, its own output matrix
    assert joint_untied_output.src_embed.embed.weight is joint_untied_output.tgt_embed.embed.weight
    assert joint_untied_output.output.weight is not joint_untied_output.tgt_embed.embed.weight
    # A shared matrix is one parameter: counted once, and given gradients from every use.
    assert separate.num_parameters() - joint.num_parameters() == V * D
    assert untied.num_parameters() - separate.num_parameters() == V * D
    with pytest.raises(ValueError):
        Transformer(ModelConfig(d_model=D, n_heads=H, n_layers=1, d_ff=FF), V, V + 1, share_all_embeddings=True)


def test_sinusoids_follow_section_3_5():
    pe = sinusoids(101, 4)  # d_model 4: frequencies 1 and 1/10000^(2/4) = 1/100
    hand = {  # (pos, dim): value, worked out by hand from PE(pos, 2i) = sin(pos / 10000^(2i/4)), cos at 2i+1
        (0, 0): 0.0, (0, 1): 1.0, (0, 2): 0.0, (0, 3): 1.0,
        (1, 0): 0.8414709848, (1, 1): 0.5403023059,  # sin(1), cos(1)
        (1, 2): 0.0099998333, (1, 3): 0.9999500004,  # sin(0.01), cos(0.01)
        (3, 0): 0.1411200081, (3, 1): -0.9899924966,  # sin(3), cos(3)
        (100, 2): 0.8414709848, (100, 3): 0.5403023059,  # sin(100/100), cos(100/100)
    }
    for (pos, dim), value in hand.items():
        assert pe[pos, dim].item() == pytest.approx(value, abs=1e-7), (pos, dim)


def test_embeddings_are_token_vectors_times_sqrt_d_model_plus_sinusoids():
    model = tiny()
    src, _ = batch()
    pe = sinusoids(7, D)
    assert_close(model.src_embed(src), model.src_embed.embed.weight[src] * math.sqrt(D) + pe)
    # The incremental decoder's positions: two tokens at positions 5 and 6.
    tokens = src[:, :2]
    assert_close(model.tgt_embed(tokens, start=5), model.tgt_embed.embed.weight[tokens] * math.sqrt(D) + pe[5:7])


def test_inputs_longer_than_max_positions_work_and_match_a_larger_table():
    torch.manual_seed(0)
    short = Transformer(ModelConfig(d_model=D, n_heads=H, n_layers=1, d_ff=FF, dropout=0.0, max_positions=8), V, V)
    long = Transformer(ModelConfig(d_model=D, n_heads=H, n_layers=1, d_ff=FF, dropout=0.0, max_positions=64), V, V)
    long.load_state_dict(short.state_dict())  # the table is not in the state dict
    short.eval(), long.eval()
    src, tgt = torch.randint(4, V, (2, 20)), torch.randint(4, V, (2, 12))
    tgt[:, 0] = BOS
    out = short(src, tgt)
    assert_close(out, long(src, tgt), **TOL)
    assert short.src_embed.pe.size(0) >= 20
    assert_close(short.src_embed.pe[:20], sinusoids(20, D))
    # The incremental decoder past the table, from a fresh model whose table grows inside inference mode...
    torch.manual_seed(0)
    fresh = Transformer(ModelConfig(d_model=D, n_heads=H, n_layers=1, d_ff=FF, dropout=0.0, max_positions=8), V, V)
    fresh.eval()
    with torch.inference_mode():
        state = fresh.start_decoding(src)
        steps = torch.stack([fresh.decode_step(tgt[:, t], state) for t in range(12)], 1)
    assert_close(steps, out, **TOL)
    # ... which a later training step can still use (an inference-mode table could not be).
    fresh.train()
    fresh(src, tgt).sum().backward()


# ---- initialisation


def test_init_is_xavier_uniform_with_zero_biases_unit_gains_and_zero_padding_rows():
    model = tiny("pre", share=False, tie_embeddings=False)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            bound = math.sqrt(6.0 / sum(p.shape))  # Xavier-uniform over the whole (fused) matrix
            # Uniform(-bound, bound): inside it, and (with 1,600+ samples) close to its end.
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
        elif "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name
    for embed in (model.src_embed.embed, model.tgt_embed.embed):
        assert torch.all(embed.weight[PAD] == 0) and embed.weight[PAD + 1].abs().sum() > 0


def test_dropout_acts_in_training_only():
    dropped = tiny(dropout=0.3, attention_dropout=0.3, activation_dropout=0.3)
    clean = tiny()  # the same seed: the same weights
    src, tgt = batch()
    assert_close(dropped(src, tgt), clean(src, tgt))  # eval: every dropout is off
    with torch.inference_mode():
        state = dropped.start_decoding(src)
        assert_close(dropped.decode_step(tgt[:, 0], state), clean(src, tgt)[:, 0])
    dropped.train()
    assert not torch.allclose(dropped(src, tgt), dropped(src, tgt))
    for kind in ("dropout", "attention_dropout", "activation_dropout"):  # each one acts in training
        one = tiny(**{kind: 0.3}).train()
        assert not torch.allclose(one(src, tgt), clean(src, tgt)), kind


# ---- 6: activation checkpointing


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(mt.model, "checkpoint", counting_checkpoint)
    src, tgt = batch()
    grads, losses = [], []
    for flag in (False, True):
        # Dropout everywhere: the recomputed forward pass must draw the same masks as the first one.
        model = tiny("pre", activation_checkpointing=flag, dropout=0.2, attention_dropout=0.1,
                     activation_dropout=0.1).train()
        torch.manual_seed(5)
        loss = model(src, tgt).logsumexp(-1).sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == [False] * 4  # every encoder and decoder layer, once, non-reentrant
    assert_close(losses[1], losses[0])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], msg=name)
    model.eval()
    model(src, tgt)
    assert len(calls) == 4  # not at evaluation


# ---- the FLOP count for MFU


def test_flops_per_token_matches_pytorchs_flop_counter():
    model = tiny(share=False, tie_embeddings=False, n_decoder_layers=3).train()
    src, tgt = torch.randint(4, V, (2, 9)), torch.randint(4, V, (2, 5))
    # The counter has no formula for CPU's fused attention kernel; the math backend spells attention out as
    # the batched matrix products it does count.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, tgt).sum().backward()
    assert model.flops_per_token(9, 5) * 2 * 5 == counter.get_total_flops()  # per target token, 2 x 5 of them


def test_select_writes_into_the_caches_of_the_state_before_last_instead_of_new_ones():
    model = tiny("post")
    src, tgt = batch()
    K = 2
    with torch.inference_mode():
        first = model.start_decoding(src, max_len=8, beam_size=K)
        model.decode_step(tgt[:, 0].repeat_interleave(K), first)
        reorder = torch.tensor([1, 0, 3, 2, 5, 4])
        second = first.select(reorder)
        third = second.select(reorder)  # back to the first order, in the first state's own buffers
        assert third.self_kv[0][0].data_ptr() == first.self_kv[0][0].data_ptr()
        rows = torch.arange(3).repeat_interleave(K)
        assert_close(model.decode_step(tgt[rows, 1], third), model(src[rows], tgt[rows])[:, 1], **TOL)


def test_a_select_that_moves_few_rows_copies_them_inside_the_same_caches():
    model = tiny("post")
    src, tgt = batch()
    K = 2
    with torch.inference_mode():
        state = model.start_decoding(src, max_len=8, beam_size=K)
        model.decode_step(tgt[:, 0].repeat_interleave(K), state)
        model.decode_step(tgt[:, 1].repeat_interleave(K), state)
        keys, memory = state.self_kv[0][0], state.memory.data_ptr()
        # Row 5 takes row 4's place in its sentence, and sentence 1 is pruned: sentence 2's rows fill its hole.
        pruned = state.select(torch.tensor([0, 1, 4, 4]), torch.tensor([0, 2]))
        assert pruned.self_kv[0][0].data_ptr() == keys.data_ptr() and pruned.self_kv[0][0].size(0) == 4
        assert pruned.memory.data_ptr() == memory and pruned.memory.size(0) == 2
        rows = torch.tensor([0, 0, 2, 2])
        assert_close(model.decode_step(tgt[rows, 2], pruned), model(src[rows], tgt[rows])[:, 2], **TOL)


# ---- attention maps: the probabilities of the real forward pass


def _plain_probabilities(q_weight, q_bias, k_weight, k_bias, x_q, x_k, mask=None, causal=False):
    """softmax(Q K^T / sqrt(d)) per head, from the projection matrices alone: (B, H, Lq, Lk)."""
    def heads(x, w, b):
        return (x @ w.T + b).unflatten(-1, (H, D // H)).transpose(1, 2)
    scores = heads(x_q, q_weight, q_bias) @ heads(x_k, k_weight, k_bias).transpose(-1, -2) / math.sqrt(D // H)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_attention_maps_are_the_forward_pass_probabilities_of_each_layer_and_head(norm):
    model = tiny(norm)
    _randomise_norms_and_biases(model)
    src, tgt = batch()
    maps = mt.model.attention_maps(model, src, tgt)
    assert_close(maps.logits, model(src, tgt), **TOL)  # recording changes nothing downstream
    assert [len(maps.encoder), len(maps.decoder), len(maps.cross)] == [2, 2, 2]

    # Recompute every layer's input with hooks, then each layer's probabilities from its weights alone.
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, (mt.model.EncoderLayer, mt.model.DecoderLayer))]
    memory, src_pad = model.encode(src)
    model.decode(tgt, memory, src_pad)
    for h in hooks:
        h.remove()
    mask = padding_mask(src_pad)
    for i, layer in enumerate(model.encoder):
        x = inputs[f"encoder.{i}"]
        y = layer.res_attn.norm(x) if norm == "pre" else x
        w, b = layer.self_attn.qkv_proj.weight.chunk(3), layer.self_attn.qkv_proj.bias.chunk(3)
        assert_close(maps.encoder[i], _plain_probabilities(w[0], b[0], w[1], b[1], y, y, mask), **TOL)
    for i, layer in enumerate(model.decoder):
        x = inputs[f"decoder.{i}"]
        y = layer.res_self.norm(x) if norm == "pre" else x
        w, b = layer.self_attn.qkv_proj.weight.chunk(3), layer.self_attn.qkv_proj.bias.chunk(3)
        assert_close(maps.decoder[i], _plain_probabilities(w[0], b[0], w[1], b[1], y, y, causal=True), **TOL)
        # The cross-attention's queries come from the self-attention sub-layer's output.
        y = layer.res_self(x, lambda z: layer.self_attn(z, causal=True))
        y = layer.res_cross.norm(y) if norm == "pre" else y
        kw, kb = layer.cross_attn.kv_proj.weight.chunk(2), layer.cross_attn.kv_proj.bias.chunk(2)
        expected = _plain_probabilities(layer.cross_attn.q_proj.weight, layer.cross_attn.q_proj.bias, kw[0], kb[0],
                                        y, memory, mask)
        assert_close(maps.cross[i], expected, **TOL)
        assert_close(maps.cross[i].sum(-1), torch.ones(3, H, tgt.size(1)), **TOL)
        assert maps.cross[i][1, :, :, 4:].abs().max() == 0  # row 1's source padding gets no attention
    assert not any(m.keep_probabilities for m in model.modules() if isinstance(m, mt.model.MultiHeadAttention))
