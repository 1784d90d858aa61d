"""FP8 quantisation of attention inputs for the kernels' e4m3 path, and the random rotation ("incoherent
processing") that makes it more accurate; plain PyTorch, CPU or CUDA, no compiled extension needed.

The FP8 kernels take q, k, v as torch.float8_e4m3fn and one float32 dequantisation scale ("descale") per
(batch entry, kv head) for each of them: q_descale, k_descale, v_descale of shape (batch, num_heads_k), any
strides. `quantize_fp8` produces such a pair from a 16- or 32-bit tensor. The value a kernel reads back is

    x ≈ x_fp8.float() * descale          (descale broadcast over the sequence, the heads of its group, d)

which `dequantize_fp8` computes. The descale is amax / 448 (448 = e4m3's largest finite value) with amax the
largest |x| over what shares the scale, so the largest entry maps to ±448 and the rest keep e4m3's relative
precision (3 mantissa bits: rounding error at most 2^-4 of |x| for normal values, 2^-10 · descale below e4m3's
smallest normal, 2^-6 · descale).

A few large entries ("outliers") force a large descale (entries below 2^-6 · descale lose precision as
subnormals), and since e4m3's error is relative, the outliers themselves carry the largest absolute errors,
which land on the large scores that involve them, i.e. on the keys the softmax weighs most. `hadamard_rotation`
and `rotate` implement the FA3 paper's incoherent processing: multiply q and k (on the head dim) by one random
orthogonal matrix R before quantising. Because R Rᵀ = I, (q R)(k R)ᵀ = q kᵀ, so attention scores are
unchanged, but each outlier is spread over all head-dim coordinates, which lowers amax several-fold and spreads
the error evenly (benchmarks/fp8_error.py measures about half the attention-output error with outliers). v is
not rotated (that would need the inverse rotation on the output). The kernels do not rotate; do it before
quantising:

    >>> import torch
    >>> from flash_attn3.quantize import hadamard_rotation, quantize_fp8, rotate, dequantize_fp8
    >>> q = torch.randn(2, 128, 8, 64)            # (batch, seqlen, heads, head_dim)
    >>> k = torch.randn(2, 256, 2, 64)            # GQA: 2 kv heads, groups of 4 query heads
    >>> v = torch.randn(2, 256, 2, 64)
    >>> R = hadamard_rotation(64, seed=0)
    >>> q8, q_descale = quantize_fp8(rotate(q, R), num_heads_k=2)  # one scale per (batch, kv head)
    >>> k8, k_descale = quantize_fp8(rotate(k, R))
    >>> v8, v_descale = quantize_fp8(v)
    >>> q8.dtype, tuple(q_descale.shape), tuple(k_descale.shape)
    (torch.float8_e4m3fn, (2, 2), (2, 2))
    >>> qr = rotate(q, R)
    >>> err = (dequantize_fp8(q8, q_descale) - qr).abs().max() / qr.abs().max()
    >>> bool(err <= 2 ** -4)                      # e4m3's relative rounding bound
    True
    >>> # On an SM90 GPU with the fp8 kernels built (inputs moved to CUDA first):
    >>> # out = flash_attn3.flash_attn_func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale,
    >>> #                                   v_descale=v_descale)            # bfloat16, ≈ attention(q, k, v)

Layouts are FA3's: "bshd" is the dense (batch, seqlen, heads, head_dim); "thd" is the packed varlen
(total_tokens, heads, head_dim) with int32 `cu_seqlens` (batch + 1,), sequence i holding tokens
cu_seqlens[i]:cu_seqlens[i + 1]. Nothing here reads a CUDA tensor back to the host (no sync): the varlen
grouping is done on the device from cu_seqlens.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
GRANULARITIES = ("per_head", "per_tensor")
LAYOUTS = ("bshd", "thd")


# ------------------------------------------------------------------------------------------------ helpers

def _group_size(heads: int, num_heads_k: int | None, group_size: int | None) -> int:
    """Query heads per kv head from whichever of num_heads_k / group_size is given (both: they must agree)."""
    g_from_hk = None
    if num_heads_k is not None:
        if not isinstance(num_heads_k, int) or num_heads_k <= 0 or heads % num_heads_k != 0:
            raise ValueError(f"num_heads_k: must be a positive divisor of the number of heads ({heads}), "
                             f"got {num_heads_k!r}")
        g_from_hk = heads // num_heads_k
    if group_size is not None:
        if not isinstance(group_size, int) or group_size <= 0 or heads % group_size != 0:
            raise ValueError(f"group_size: must be a positive divisor of the number of heads ({heads}), "
                             f"got {group_size!r}")
        if g_from_hk is not None and g_from_hk != group_size:
            raise ValueError(f"group_size={group_size} disagrees with num_heads_k={num_heads_k} for {heads} heads "
                             f"(group_size = heads / num_heads_k = {g_from_hk})")
        return group_size
    return 1 if g_from_hk is None else g_from_hk


def _check_layout(x: torch.Tensor, layout: str, cu_seqlens: torch.Tensor | None) -> int:
    """Validates x against the layout; returns the batch size."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bshd":
        if x.dim() != 4:
            raise ValueError(f"x: layout 'bshd' needs a 4-D (batch, seqlen, heads, head_dim) tensor, got shape "
                             f"{tuple(x.shape)}")
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: only meaningful with layout='thd' (packed varlen)")
        return x.shape[0]
    if x.dim() != 3:
        raise ValueError(f"x: layout 'thd' needs a 3-D (total_tokens, heads, head_dim) tensor, got shape "
                         f"{tuple(x.shape)}")
    if cu_seqlens is None:
        raise ValueError("cu_seqlens: required with layout='thd' (int32 tensor of batch + 1 offsets)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens: must be a 1-D int32 (or int64) tensor of batch + 1 offsets")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens: must be on x's device ({x.device}), got {cu_seqlens.device}")
    return cu_seqlens.numel() - 1


def _token_batch_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 (total,) batch entry of each packed token; `batch` for tokens outside [cu[0], cu[-1]) (padding),
    so that they go to one extra row that is dropped. Computed on the device, no host sync."""
    batch = cu_seqlens.numel() - 1
    tok = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    idx = torch.searchsorted(cu_seqlens[1:].contiguous(), tok, right=True)  # number of sequences ending <= tok
    outside = (tok < cu_seqlens[0]) | (idx >= batch)
    return torch.where(outside, torch.full_like(idx, batch), idx)


def _amax_per_kv_head(x_abs: torch.Tensor, layout: str, group: int, rows, batch: int) -> torch.Tensor:
    """float32 (batch, h_k) amax of |x| over sequence, group heads and head dim; "thd" (rows = each token's
    batch entry) has one more row, of the padding tokens: (batch + 1, h_k)."""
    heads = x_abs.shape[-2]
    h_k = heads // group
    if layout == "bshd":
        per_head = x_abs.amax(dim=(1, 3)) if x_abs.shape[1] * x_abs.shape[3] > 0 else \
            x_abs.new_zeros(batch, heads)
        return per_head.reshape(batch, h_k, group).amax(dim=-1)
    total = x_abs.shape[0]
    per_token = x_abs.amax(dim=-1) if x_abs.shape[-1] > 0 else x_abs.new_zeros(total, heads)  # (total, h)
    per_token = per_token.reshape(total, h_k, group).amax(dim=-1)  # (total, h_k)
    amax = x_abs.new_zeros(batch + 1, h_k)
    amax.scatter_reduce_(0, rows[:, None].expand(total, h_k), per_token, reduce="amax", include_self=True)
    return amax


def _broadcast_descale(descale_rows: torch.Tensor, layout: str, group: int, rows) -> torch.Tensor:
    """(batch[+1], h_k) descale -> a tensor broadcastable against x in its layout."""
    per_head = descale_rows.repeat_interleave(group, dim=1) if group > 1 else descale_rows  # (batch[+1], h)
    if layout == "bshd":
        return per_head[:, None, :, None]
    return per_head.index_select(0, rows)[:, :, None]


# ------------------------------------------------------------------------------------------------ quantise

def quantize_fp8(x: torch.Tensor, *, granularity: str = "per_head", layout: str = "bshd",
                 cu_seqlens: torch.Tensor | None = None, num_heads_k: int | None = None,
                 group_size: int | None = None, scale=None, eps: float = 1e-12):
    """Quantises x to float8_e4m3fn with one float32 descale per (batch entry, kv head) or per tensor.

    Args:
        x: floating tensor (float16 / bfloat16 / float32 / float64), (batch, seqlen, heads, head_dim) for
            layout "bshd", (total_tokens, heads, head_dim) for layout "thd". Should be finite (a NaN stays
            NaN; an inf makes its group's descale inf).
        granularity: "per_head": amax over the sequence, head dim and the heads of one kv-head group, per
            batch entry (varlen: per sequence); "per_tensor": one amax over all of x (including "thd" padding
            tokens), the descale being that scalar expanded to (batch, num_heads_k) with strides (0, 0).
        layout: "bshd" (dense) or "thd" (packed varlen, needs cu_seqlens).
        cu_seqlens: int32 (batch + 1,) offsets for layout "thd". Tokens outside [cu_seqlens[0],
            cu_seqlens[-1]) get a scale of their own (amax over them), which no kernel reads. An empty
            sequence gets the descale eps.
        num_heads_k, group_size: for q with more heads than k (GQA / MQA): the number of kv heads, or the
            query heads per kv head (heads / num_heads_k); give either (both: they must agree). The kernel
            applies q_descale[b, j] to all query heads of kv head j (query heads j·group ... (j+1)·group - 1),
            so their amax is taken together. Default: one group per head (k, v, or q without GQA).
        scale: a given descale instead of the amax one (e.g. from calibration): a Python number or a float
            tensor broadcastable to (batch, num_heads_k); granularity is then not used. Values beyond ±448
            after division saturate.
        eps: lower bound of the descale, so an all-zero group does not divide by zero.

    Returns:
        (x_fp8, descale): x_fp8 of x's shape, dtype torch.float8_e4m3fn; descale float32 of shape
        (batch, num_heads_k), the kernel's q/k/v_descale, with x ≈ x_fp8.float() * descale (broadcast as in
        `dequantize_fp8`). descale = max(amax / 448, eps) and x_fp8 = clamp(x / descale, -448, 448) rounded
        to nearest-even e4m3 (the clamp saturates instead of letting the cast produce NaN out of range).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                          torch.float64):
        raise TypeError(f"x: must be a float16 / bfloat16 / float32 / float64 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: must be one of {GRANULARITIES}, got {granularity!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")
    batch = _check_layout(x, layout, cu_seqlens)
    heads = x.shape[-2]
    group = _group_size(heads, num_heads_k, group_size)
    h_k = heads // group

    x = x.detach()
    xf = x.float()
    rows = _token_batch_index(cu_seqlens, x.shape[0]) if layout == "thd" else None
    if scale is not None:
        given = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        try:
            descale = given.clamp_min(eps).broadcast_to((batch, h_k))
        except RuntimeError as exc:
            raise ValueError(f"scale: must broadcast to (batch, num_heads_k) = ({batch}, {h_k}), got shape "
                             f"{tuple(given.shape)}") from exc
        # Padding tokens of "thd" (row `batch`) reuse the scale of the last row, or 1 when there is none.
        descale_rows = descale if layout == "bshd" else torch.cat(
            [descale, descale[-1:] if batch > 0 else descale.new_ones(1, h_k)], dim=0)
    elif granularity == "per_tensor":
        amax = xf.abs().amax() if xf.numel() > 0 else xf.new_zeros(())
        scalar = (amax / FP8_MAX).clamp_min(eps)
        descale = scalar.expand(batch, h_k)
        descale_rows = scalar.expand(batch + (layout == "thd"), h_k)
    else:
        amax = _amax_per_kv_head(xf.abs(), layout, group, rows, batch)
        descale_rows = (amax / FP8_MAX).clamp_min(eps)
        descale = descale_rows[:batch] if layout == "thd" else descale_rows

    scaled = xf / _broadcast_descale(descale_rows, layout, group, rows)
    x_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8, descale


def dequantize_fp8(x_fp8: torch.Tensor, descale: torch.Tensor, *, layout: str = "bshd",
                   cu_seqlens: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_fp8.float() * descale, the descale (batch, num_heads_k) broadcast over the sequence, the query heads
    of each kv-head group (heads / num_heads_k of them, from the shapes) and the head dim, as the kernel
    applies it. Layouts as `quantize_fp8`; "thd" padding tokens (outside the sequences) come back as 0."""
    batch = _check_layout(x_fp8, layout, cu_seqlens)
    heads = x_fp8.shape[-2]
    if descale.dim() != 2 or descale.shape[0] != batch or descale.shape[1] <= 0 or heads % descale.shape[1]:
        raise ValueError(f"descale: must have shape (batch, num_heads_k) with num_heads_k dividing {heads} heads "
                         f"and batch = {batch}, got {tuple(descale.shape)}")
    group = heads // descale.shape[1]
    descale = descale.float()
    rows = None
    if layout == "thd":
        rows = _token_batch_index(cu_seqlens, x_fp8.shape[0])
        descale = torch.cat([descale, descale.new_zeros(1, descale.shape[1])], dim=0)  # padding row -> 0
    return (x_fp8.float() * _broadcast_descale(descale, layout, group, rows)).to(dtype)


# ------------------------------------------------------------------------------------------------ rotation

def _sylvester_hadamard(n: int) -> torch.Tensor:
    """float64 (n, n) ±1 Hadamard matrix of a power of two n: H_1 = [1], H_2m = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard_rotation(head_dim: int, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32):
    """A random orthogonal (head_dim, head_dim) matrix R for `rotate` (x -> x @ R), the same for a given seed
    on every device.

    Power-of-two head_dim: the randomised Hadamard transform R = D · H / sqrt(d), with H the Sylvester
    Hadamard matrix (±1 entries, H Hᵀ = d·I, symmetric) and D a diagonal of random signs. On column vectors
    that is x -> (H · D / sqrt(d)) x: flip random signs, then mix every coordinate into every other with equal
    weight, so one outlier of size a becomes d entries of size a / sqrt(d). Every entry of R is ±1/sqrt(d).

    Other head dims (e.g. 80, 96): a Haar-random orthogonal matrix, Q of the QR factorisation of a Gaussian
    (d, d) matrix with the signs of R's diagonal folded into Q (which makes the distribution uniform). A
    block-diagonal of Hadamards (80 = 5 blocks of 16, 96 = 3 of 32) would also be orthogonal, but it mixes
    only within a block, so an outlier would be spread over 16 or 32 coordinates instead of all d; `rotate`
    is a dense matmul either way, so the dense matrix costs nothing more.

    Built in float64 on the CPU from torch.Generator(seed), then cast to `dtype` and moved to `device`.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim: must be a positive int, got {head_dim!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if head_dim & (head_dim - 1) == 0:
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        r = signs[:, None] * _sylvester_hadamard(head_dim) / math.sqrt(head_dim)
    else:
        gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, upper = torch.linalg.qr(gauss)
        diag_sign = torch.sign(torch.diagonal(upper))
        r = q * torch.where(diag_sign == 0, torch.ones_like(diag_sign), diag_sign)[None, :]
    return r.to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x @ R on the last dim (any leading shape), computed and returned in the promotion of x's and R's dtypes
    but at least float32 (so a bfloat16 x is not rounded again before quantisation). Apply the same R to q
    and k: (q R)(k R)ᵀ = q R Rᵀ kᵀ = q kᵀ for orthogonal R."""
    if R.dim() != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R: must be a square (head_dim, head_dim) matrix, got shape {tuple(R.shape)}")
    if x.shape[-1] != R.shape[0]:
        raise ValueError(f"x: last dim ({x.shape[-1]}) must equal R's size ({R.shape[0]})")
    dtype = torch.promote_types(torch.promote_types(x.dtype, R.dtype), torch.float32)
    return torch.matmul(x.to(dtype), R.to(device=x.device, dtype=dtype))


__all__ = ["FP8", "FP8_MAX", "dequantize_fp8", "hadamard_rotation", "quantize_fp8", "rotate"]
