"""The Transformer: masking, equivalence with PyTorch's own layers, incremental decoding, tying."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mt.config import ModelConfig
from mt.model import Transformer, sinusoids

PAD, BOS, EOS, V = 0, 2, 3, 40


def tiny(norm: str = "post", share: bool = True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, norm=norm, **kw)
    return Transformer(cfg, V, V, pad_id=PAD, share_all_embeddings=share).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (3, 7), generator=g)
    src[1, 4:] = PAD
    src[2, 6:] = PAD
    tgt = torch.randint(4, V, (3, 6), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_never_changes_outputs_at_real_positions(norm):
    model = tiny(norm)
    src, tgt = batch()
    out = model(src, tgt)
    padded_src = torch.cat([src, torch.full((3, 5), PAD)], 1)
    padded_tgt = torch.cat([tgt, torch.full((3, 4), PAD)], 1)
    out_padded = model(padded_src, padded_tgt)
    torch.testing.assert_close(out_padded[:, :6], out)
    # A sentence alone (no padding at all) equals its padded copy in the batch.
    alone = model(src[1:2, :4], tgt[1:2])
    torch.testing.assert_close(alone, out[1:2])


def test_future_target_tokens_never_change_past_outputs():
    model = tiny()
    src, tgt = batch()
    out = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1) % V
    out2 = model(src, changed)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def _copy_attention(ref: nn.MultiheadAttention, ours) -> None:
    with torch.no_grad():
        if ours.cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv_proj.weight)
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_encoder_layer_equals_pytorch_transformer_encoder_layer(norm):
    model = tiny(norm)
    ours = model.encoder[0]
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm == "pre").eval()
    _copy_attention(ref.self_attn, ours.self_attn)
    ref.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    ref.norm1.load_state_dict(ours.res_attn.norm.state_dict())
    ref.norm2.load_state_dict(ours.res_ffn.norm.state_dict())
    x = torch.randn(3, 7, 32)
    src, _ = batch()
    pad = src.eq(PAD)
    expected = ref(x, src_key_padding_mask=pad)
    got = ours(x, model.attention_mask(pad))
    torch.testing.assert_close(got[~pad], expected[~pad], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoder_layer_equals_pytorch_transformer_decoder_layer(norm):
    model = tiny(norm)
    ours = model.decoder[0]
    ref = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm == "pre").eval()
    _copy_attention(ref.self_attn, ours.self_attn)
    _copy_attention(ref.multihead_attn, ours.cross_attn)
    ref.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    for i, res in enumerate((ours.res_self, ours.res_cross, ours.res_ffn), start=1):
        getattr(ref, f"norm{i}").load_state_dict(res.norm.state_dict())
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 7, 32)
    src, _ = batch()
    pad = src.eq(PAD)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=pad)
    got = ours(x, memory, model.attention_mask(pad))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_incremental_decoding_equals_the_full_forward_pass(norm):
    model = tiny(norm)
    src, tgt = batch()
    full = model(src, tgt)
    state = model.start_decoding(src, max_len=2)  # small on purpose: the cache must grow
    steps = [model.decode_step(tgt[:, t], state) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_after_select_equals_forward_on_the_selected_rows():
    model = tiny()
    src, tgt = batch()
    state = model.start_decoding(src)
    for t in range(3):
        model.decode_step(tgt[:, t], state)
    for index in ([2, 0, 1], [1, 1, 0, 2, 2], [2]):  # permute, expand, prune
        idx = torch.tensor(index)
        picked = state.select(idx)
        logits = [model.decode_step(tgt[idx, t], picked) for t in range(3, 6)]
        expected = model(src[idx], tgt[idx])[:, 3:6]
        torch.testing.assert_close(torch.stack(logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_joint_vocabulary_ties_all_three_matrices_and_separate_ties_target_and_output():
    joint = tiny(share=True)
    assert joint.src_embed.embed.weight is joint.tgt_embed.embed.weight is joint.output.weight
    separate = tiny(share=False)
    assert separate.tgt_embed.embed.weight is separate.output.weight
    assert separate.src_embed.embed.weight is not separate.tgt_embed.embed.weight
    untied = tiny(share=False, tie_embeddings=False)
    assert untied.output.weight is not untied.tgt_embed.embed.weight
    assert torch.all(joint.src_embed.embed.weight[PAD] == 0)


def test_sinusoids_follow_section_3_5():
    pe = sinusoids(50, 16)
    for pos, i in ((0, 0), (3, 0), (7, 2), (49, 7)):
        angle = pos / 10000 ** (2 * i / 16)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_inputs_longer_than_max_positions_still_work():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0, max_positions=8)
    model = Transformer(cfg, V, V).eval()
    src = torch.randint(4, V, (2, 20))
    tgt = torch.randint(4, V, (2, 12))
    out = model(src, tgt)
    assert out.shape == (2, 12, V) and torch.isfinite(out).all()
    torch.testing.assert_close(model.src_embed.pe[:20], sinusoids(20, 16))


def test_activation_checkpointing_gives_the_same_gradients():
    src, tgt = batch()
    grads = []
    for flag in (False, True):
        model = tiny(activation_checkpointing=flag).train()
        model(src, tgt).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])
