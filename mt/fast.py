"""Faster kernels for the paper's model, swapped in by `speed_up`: the one place they are chosen.

`mt.model` is the reference: `nn.Dropout` and `scaled_dot_product_attention`. Each path here computes the same
function and is tested against it (tests/test_fast.py); each was kept because it measurably pays
(`python scripts/bench.py --against plain --plain PART`: paired runs of plain and fast, figures in
docs/performance.md):

- `Dropout` on a CPU draws 16 random bits per element instead of PyTorch's one `bernoulli_` draw each, and
  applies the mask as numbers (a multiplication, forward and backward) instead of through `where`.
- `int8_linears` gives CPU decoding int8 weights (dynamic quantization: activations quantized on the fly).
- `bf16_cpu_linears` gives bf16 decoding on a CPU matrix products of a few row counts only, with weights packed
  once: oneDNN builds a kernel for each new shape (about 2 ms each), a search meets hundreds of row counts,
  and F.linear repacks the weight at every call.
- `attention` for bf16 training on a CPU spells Equation 1 out, where PyTorch's fused CPU kernel has a slow
  bf16 backward. On CUDA it runs SDPA without cuDNN's kernel, which builds a new graph for every tensor shape
  it meets (varied batches, every decoding step).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mt.errors import MTError
from mt.model import MultiHeadAttention, sdpa_attention

SOFTMAX_MIN_ROW = 16  # see attention_spelled_out

def speed_up(model: nn.Module) -> nn.Module:
    """Swap the fast paths into `model` in place (every `nn.Dropout` and every attention) and return it.
    The weights and the function computed stay the same; only the random dropout masks differ."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p))
        if isinstance(module, MultiHeadAttention):
            module.kernel = attention
    return model


class Dropout(nn.Dropout):
    """nn.Dropout (zero each element with probability p, scale the rest by 1 / (1 - p)) with a cheaper mask
    on a CPU; elsewhere PyTorch's fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """x (...) -> (...). On a CPU each element gets 16 random bits (four per 64-bit draw) and is kept when they
    are at or above round(p * 2^16): the keep probability is within 2^-17 of 1 - p, and kept elements are
    scaled by the exact inverse of it."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    drop = round(p * 65536)
    scale = 65536 / (65536 - drop) if drop < 65536 else 0.0
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64)
    bits.random_(-2 ** 63, None)  # the full 64-bit range: with no bounds, random_ leaves the sign bit zero
    # The mask as 0/1 numbers in x's dtype where that is 2 bytes, else in one byte, so that applying it here
    # and in the backward pass is a multiplication; the scale is applied in float32 or wider, rounded once.
    mask_dtype = x.dtype if x.element_size() <= 2 else torch.uint8
    keep = torch.ge(bits.view(torch.int16)[:x.numel()].view(x.shape), drop - 32768,
                    out=torch.empty(x.shape, dtype=mask_dtype))
    return (x * keep).mul_(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              dropout_p: float = 0.0) -> Tensor:
    """`mt.model.sdpa_attention`, by the fastest path for the device and dtype: the same arguments and result,
    q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask broadcastable to (B, H, Lq, Lk) -> (B, H, Lq, Dh)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        return attention_spelled_out(q, k, v, mask, causal, dropout_p)
    if q.device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        backends = sdpa_backends_without_cudnn()
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():  # unless cuDNN is all that is on
            return sdpa_attention(q, k, v, mask, causal, dropout_p)
    return sdpa_attention(q, k, v, mask, causal, dropout_p)


def attention_spelled_out(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                          dropout_p: float) -> Tensor:
    """Equation 1 as two batched products in q's dtype around a float32 softmax; shapes as `attention`'s.

    For bf16 training on a CPU, where PyTorch's fused kernel has a bf16 backward several times slower than its
    float32 one (in inference, decoding steps included, the fused kernel is the faster). Masking follows
    SDPA: `causal` aligns at the top left (query i sees keys 0..i), and a query that may see no key gets
    zeros, not NaN.
    """
    products = torch.matmul(q, k.transpose(-2, -1))  # (B, H, Lq, Lk)
    lq, lk = products.shape[-2:]
    # PyTorch's CPU softmax has no vector code for rows shorter than 16: short rows of keys get -inf columns
    # (probability zero) up to SOFTMAX_MIN_ROW.
    if lk >= SOFTMAX_MIN_ROW:
        scores = products.float()
    else:
        scores = products.new_full((*products.shape[:-1], SOFTMAX_MIN_ROW), float("-inf"), dtype=torch.float32)
        scores[..., :lk] = products
    scores.mul_(q.size(-1) ** -0.5)
    # Masks are added as 0 / -inf biases: cheaper than a broadcast masked_fill_ here, and free backward.
    if causal:
        scores[..., :lk] += torch.full((lq, lk), float("-inf"), device=q.device).triu_(1)
    if mask is not None:
        scores[..., :lk] += torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)[..., :lk]
    # The fill for queries that see nothing costs two passes; a CPU reads the mask for free to skip it (a
    # compiled graph would break on the read, so it always fills).
    if mask is not None and (torch.compiler.is_compiling() or not bool(mask.any(dim=-1).all())):
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(dropout(probs.to(q.dtype), dropout_p), v)


def int8_linears(model: nn.Module) -> nn.Module:
    """`model` (float32, on the CPU, for inference) with every nn.Linear replaced by PyTorch's dynamically
    quantized one: int8 weights, one scale per matrix, activations quantized per call (fbgemm's int8 GEMM)."""
    import warnings

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # torch has deprecated it for torchao, so a later torch may not have it
        raise MTError(f"decode.precision int8 needs torch.ao.quantization, which this torch ({torch.__version__}) "
                      "does not have: use fp32 or bf16, or a torch that has it (2.13 does)") from None

    with warnings.catch_warnings():  # torch marks its quantized-tensor constructors as deprecated
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.float().eval(), {nn.Linear}, dtype=torch.qint8, inplace=True)


ROW_BUCKET = 32  # see bf16_cpu_linears


class BF16CPULinear(nn.Linear):
    """nn.Linear for bf16 inference on a CPU, where oneDNN runs the matrix product: on a row count rounded up
    to a multiple of ROW_BUCKET (zero rows, whose outputs are dropped) and, where this torch has oneDNN, with
    the weight packed once into oneDNN's blocked layout (`packed`, used without autograd), which F.linear
    repacks at every call. The same function. `packed` is a copy of the weight: not updated if the weight
    changes in place, dropped (F.linear again) when the module is moved or cast, copied or pickled."""

    packed: Tensor | None = None

    def _apply(self, fn, recurse=True):
        self.packed = None  # packed for the weight as it was (`.to`, `.float` and the like)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**super().__getstate__(), "packed": None}  # oneDNN's packed tensor has no storage to copy

    def pack(self) -> "BF16CPULinear":
        """Pack the weight for oneDNN, if this torch has it and its bf16 path runs on this CPU (AVX512BW/VL/DQ
        or AVX-NE-CONVERT; packing raises otherwise); otherwise leave F.linear to run the product."""
        mkldnn = torch.ops.mkldnn
        if torch.backends.mkldnn.is_available() and getattr(mkldnn, "_is_mkldnn_bf16_supported", lambda: False)():
            self.packed = mkldnn._reorder_linear_weight(self.weight.detach(), None)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features)."""
        rows = x.shape[:-1].numel()
        flat = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, -rows % ROW_BUCKET))
        if self.packed is not None and rows and not torch.is_grad_enabled():  # the packed product has no backward
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        else:
            out = F.linear(flat, self.weight, self.bias)
        return out[:rows].view(*x.shape[:-1], self.out_features)


def bf16_cpu_linears(model: nn.Module) -> nn.Module:
    """`model` (bf16, on a CPU, for inference) with every nn.Linear a packed `BF16CPULinear`, in place.

    oneDNN, which runs bf16 matrix products on a CPU, builds and caches a kernel per shape, about 2 ms each; a
    beam search's row count changes at every step and batch, so the cache keeps missing (1,024 entries, 7
    linear shapes) and the builds cost more than the products. Rounding the rows up to a multiple of 32 leaves
    a few dozen shapes per matrix. Each weight is packed once, where F.linear repacks it at every call."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BF16CPULinear
            module.pack()
    return model


def sdpa_backends_without_cudnn() -> list[SDPBackend]:
    """SDPA's GPU kernels that are enabled (torch.backends.cuda), cuDNN's left out. Read at each call, so a
    user's own choice of kernels still holds, and per attention call, so activation checkpointing recomputes
    with the same kernel."""
    cuda = torch.backends.cuda
    return [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                                        (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
                                        (SDPBackend.MATH, cuda.math_sdp_enabled())) if on]
