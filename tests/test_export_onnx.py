"""ONNX export: encoder.onnx and decoder_step.onnx, run by onnxruntime, against the mt model they came from
(teacher-forced log-probabilities, greedy and beam search through OnnxModel, a plain numpy greedy loop as the
README shows it), int8 quantization, and the errors a user can meet."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from mt.config import ModelConfig
from mt.errors import MTError
from mt.export.onnx import OnnxModel, write_onnx
from mt.fast import speed_up
from mt.model import Transformer
from mt.search import beam_search, greedy_search

PAD, BOS, EOS = 0, 2, 3
V = 50
SRC_LENGTHS = [7, 3, 9, 1, 5, 4]  # words before EOS: a batch with padding, and a one-word sentence


def tiny_model(norm: str, n_layers: int = 2, n_decoder_layers: int = 3) -> Transformer:
    """A random model whose weights are scaled up (x3), so that its outputs depend on the input: greedy search
    of a freshly initialised model repeats one token. Post-norm: tied output projection and mt.fast's kernels
    (as translate loads a checkpoint); pre-norm: untied and the plain kernels."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=n_layers, n_decoder_layers=n_decoder_layers, d_ff=64,
                      dropout=0.0, norm=norm, tie_embeddings=norm == "post")
    model = Transformer(cfg, V, V)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return (speed_up(model) if norm == "post" else model).eval()


def source_batch() -> torch.Tensor:
    """(6, 10) long: random words, EOS, PAD."""
    g = torch.Generator().manual_seed(1)
    src = torch.full((len(SRC_LENGTHS), max(SRC_LENGTHS) + 1), PAD, dtype=torch.long)
    for i, n in enumerate(SRC_LENGTHS):
        src[i, :n] = torch.randint(4, V, (n,), generator=g)
        src[i, n] = EOS
    return src


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's decoding steps run ~100x slower on two torch threads when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["post", "pre"])
def exported(request, tmp_path_factory):
    model = tiny_model(request.param)
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    write_onnx(model, out)
    return model, out


def teacher_forced(onnx_model: OnnxModel, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    """log-probs (B, T, V) of tgt_in (B, T) fed one position at a time."""
    state = onnx_model.start_decoding(src)
    return torch.stack([onnx_model.decode_step(tgt_in[:, t], state) for t in range(tgt_in.size(1))], dim=1)


def test_step_by_step_log_probs_match_the_teacher_forced_model(exported):
    model, out = exported
    src = source_batch()
    tgt_in = torch.randint(4, V, (src.size(0), 8), generator=torch.Generator().manual_seed(2))
    tgt_in[:, 0] = BOS
    with torch.no_grad():
        expected = F.log_softmax(model(src, tgt_in), dim=-1)
    onnx_model = OnnxModel(out, intra_op_num_threads=1)
    got = teacher_forced(onnx_model, src, tgt_in)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-4
    # The sinusoid tables are the graphs' constants: their size is the position limit OnnxModel checks.
    assert onnx_model.max_src_positions == model.src_embed.pe.size(0)
    assert onnx_model.max_tgt_positions == model.tgt_embed.pe.size(0)


def test_greedy_and_beam_search_give_the_model_s_tokens(exported):
    model, out = exported
    onnx_model = OnnxModel(out, intra_op_num_threads=1)
    src = source_batch()
    for batch in (src, src[3:4]):  # B = 1 too
        for search, kwargs in ((greedy_search, {}), (beam_search, {"beam_size": 4, "alpha": 0.6})):
            want = search(model, batch, bos=BOS, eos=EOS, pad=PAD, max_len_b=8, **kwargs)
            got = search(onnx_model, batch, bos=BOS, eos=EOS, pad=PAD, max_len_b=8, **kwargs)
            assert torch.equal(got.tokens, want.tokens), search.__name__
            assert torch.equal(got.lengths, want.lengths)
            assert torch.allclose(got.scores, want.scores, atol=1e-4)
    # The scaled weights make the output depend on the source: a mismatch in the cross-attention rows (beams,
    # pruning) shows. (A random post-norm model still repeats one word per sentence.)
    greedy = greedy_search(model, src, bos=BOS, eos=EOS, pad=PAD, max_len_b=8).tokens[:, 0]
    assert len(set(greedy.flatten().tolist()) - {PAD, EOS}) > 1


def readme_greedy(encoder, decoder, src: np.ndarray, max_len_b: int = 50) -> list[int]:
    """The README's example without SentencePiece: one sentence src (1, S) int64 (ids + EOS) -> output ids
    without EOS. Stops one token short of mt's limit, S + max_len_b tokens counting EOS, where mt forces EOS."""
    cross_keys, cross_values, mask = encoder.run(None, {"src": src})
    L, B, H, _, Dh = cross_keys.shape
    keys = values = np.zeros((L, B, H, 0, Dh), np.float32)
    token, out = np.array([BOS]), []
    for _ in range(src.shape[1] + max_len_b - 1):
        log_probs, keys, values = decoder.run(None, {"tokens": token, "self_keys": keys, "self_values": values,
                                                     "cross_keys": cross_keys, "cross_values": cross_values,
                                                     "source_mask": mask})
        log_probs[:, PAD] = -np.inf  # mt never outputs PAD
        token = log_probs.argmax(-1)
        if token[0] == EOS:
            break
        out.append(int(token[0]))
    return out


def test_a_plain_numpy_greedy_loop_gives_greedy_search_s_tokens(exported):
    model, out = exported
    encoder, decoder = (ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                        for name in ("encoder.onnx", "decoder_step.onnx"))
    src = source_batch()
    want = greedy_search(model, src, bos=BOS, eos=EOS, pad=PAD, max_len_b=8).tokens[:, 0]
    for i, n in enumerate(SRC_LENGTHS):
        expected = [t for t in want[i].tolist() if t not in (EOS, PAD)]
        assert readme_greedy(encoder, decoder, src[i:i + 1, :n + 1].numpy(), max_len_b=8) == expected


def test_int8_graphs_run_and_stay_close_to_float32(tmp_path):
    model = tiny_model("post", n_layers=1, n_decoder_layers=1)
    write_onnx(model, tmp_path, quantization="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder_step.onnx", "encoder.onnx"]
    onnx_model = OnnxModel(tmp_path)
    src = source_batch()
    tgt_in = torch.randint(4, V, (src.size(0), 8), generator=torch.Generator().manual_seed(2))
    tgt_in[:, 0] = BOS
    with torch.no_grad():
        expected = F.log_softmax(model(src, tgt_in), dim=-1)
    got = teacher_forced(onnx_model, src, tgt_in)
    # Measured on torch 2.13 / onnxruntime 1.32: mean |log-prob diff| 0.09, max |prob diff| 0.08, argmax and
    # greedy tokens 94% equal. The max |log-prob diff| (1.6) sits on unlikely tokens, so it is not bounded.
    assert (got - expected).abs().max() > 1e-6  # quantized indeed
    assert (got - expected).abs().mean() < 0.2
    assert (got.exp() - expected.exp()).abs().max() < 0.2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.85
    want = greedy_search(model, src, bos=BOS, eos=EOS, pad=PAD, max_len_b=8).tokens
    got = greedy_search(onnx_model, src, bos=BOS, eos=EOS, pad=PAD, max_len_b=8).tokens
    width = min(want.size(2), got.size(2))
    assert (want[..., :width] == got[..., :width]).float().mean() > 0.8


def test_a_source_beyond_the_graphs_positions_is_a_user_error(exported):
    model, out = exported
    onnx_model = OnnxModel(out)
    too_long = torch.full((1, model.src_embed.pe.size(0) + 1), 5, dtype=torch.long)
    with pytest.raises(MTError, match="positions"):
        onnx_model.start_decoding(too_long)


def test_unknown_quantization_is_a_user_error(tmp_path):
    with pytest.raises(MTError, match="'int4'.*onnx"):
        write_onnx(tiny_model("post"), tmp_path, quantization="int4")


def test_missing_onnxruntime_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(MTError, match=r'pip install -e "\.\[export\]"'):
        write_onnx(tiny_model("post"), tmp_path)
