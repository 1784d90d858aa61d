"""`FlashAttention`: a drop-in for torch.nn.MultiheadAttention whose attention runs through flash_attn3.sdpa,
and `replace_attention(model)`, which swaps a model's nn.MultiheadAttention submodules for it.

Same constructor, parameters (in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj) and state_dict
keys as nn.MultiheadAttention, so state dicts load both ways. Supported: bias, dropout, kdim/vdim different
from embed_dim (separate q/k/v_proj_weight, as nn.MultiheadAttention does), batch_first, unbatched inputs,
key_padding_mask, attn_mask (bool: True = not allowed, or float: added), is_causal.
Not supported: add_bias_kv and add_zero_attn (NotImplementedError).

forward() returns (attn_output, attn_weights):
  * need_weights=True: computed exactly as nn.MultiheadAttention does, by
    torch.nn.functional.multi_head_attention_forward (the weights need the full probability matrix, so the
    kernel is not used); attn_weights as nn.MultiheadAttention returns them.
  * need_weights=False: projections, then flash_attn3.sdpa, then out_proj; attn_weights is None. The kernel
    serves calls without masks (is_causal counts as no mask when seqlen_q == seqlen_k and no
    key_padding_mask is given), in eval mode or with dropout=0, without grad; everything else (incl. any
    key_padding_mask: there is no varlen fast path yet) runs on torch's SDPA with the merged float mask.
Note: nn.TransformerEncoderLayer's native inference fast path (torch._transformer_encoder_layer_fwd) reads
self_attn's weights directly and does not call self_attn.forward when its conditions hold.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flash_attn3.sdpa import sdpa

logger = logging.getLogger("flash_attn3")


def _float_mask(mask, dtype):
    """MHA mask semantics -> additive float mask: bool True = not allowed (-inf); float masks unchanged."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError("only bool and floating types of masks are supported")
    return mask.to(dtype)


class FlashAttention(nn.Module):
    """nn.MultiheadAttention's interface with attention through flash_attn3.sdpa (see the module docstring)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        unsupported = [n for n, on in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)) if on]
        if unsupported:
            raise NotImplementedError(f"FlashAttention does not support {' and '.join(unsupported)}; "
                                      "use torch.nn.MultiheadAttention for it")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError("embed_dim must be divisible by num_heads")
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias,
                                                                          **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The initialisation of nn.MultiheadAttention.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> FlashAttention:
        """A FlashAttention with mha's configuration and a copy of its weights, on its device and dtype."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("FlashAttention does not support add_bias_kv and add_zero_attn")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        new.load_state_dict(mha.state_dict())
        old_params = dict(mha.named_parameters())
        for name, p_new in new.named_parameters():
            p_new.requires_grad_(old_params[name].requires_grad)
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            return self._forward_with_weights(query, key, value, key_padding_mask, attn_mask,
                                              average_attn_weights, is_causal)
        return self._forward_sdpa(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _forward_with_weights(self, query, key, value, key_padding_mask, attn_mask, average_attn_weights,
                              is_causal):
        # nn.MultiheadAttention's own (non-fast-path) computation.
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            None, None, False, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
            use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _project(self, query, key, value):
        """q, k, v in (batch, seqlen, embed_dim); one GEMM for self-attention with a packed in_proj_weight."""
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:
                qkv = F.linear(query, w, b)
                return qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
            if key is value:
                q = F.linear(query, w[:e], bq)
                kv = F.linear(key, w[e:], None if b is None else b[e:])
                return q, kv[..., :e], kv[..., e:]
            return F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def _forward_sdpa(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        is_batched = query.dim() == 3
        if not is_batched:
            if query.dim() != 2:
                raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received "
                                     f"{query.dim()}-D query tensor")
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # to (batch, seqlen, embed) views, keeping query/key/value identity for the packed projection
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query = query.transpose(0, 1)
                    key = value = key.transpose(0, 1)
            else:
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got "
                                 f"{query.shape[-1]}")
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's "
                                 f"{tuple(value.shape[:2])}")

        dtype = query.dtype
        kpm = _float_mask(key_padding_mask, dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        mask = None
        causal = False
        if is_causal and kpm is None:
            causal = True  # the hint: attn_mask is the causal mask, so the kernel's causal mode replaces it
        else:
            mask = _float_mask(attn_mask, dtype)
            if mask is not None:
                if mask.dim() == 2:
                    if tuple(mask.shape) != (tgt_len, src_len):
                        raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should "
                                           f"be {(tgt_len, src_len)}.")
                    mask = mask.view(1, 1, tgt_len, src_len)
                elif mask.dim() == 3:
                    if tuple(mask.shape) != (bsz * self.num_heads, tgt_len, src_len):
                        raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should "
                                           f"be {(bsz * self.num_heads, tgt_len, src_len)}.")
                    mask = mask.view(bsz, self.num_heads, tgt_len, src_len)
                else:
                    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
            if kpm is not None:
                if tuple(kpm.shape) != (bsz, src_len):
                    raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                         f"{tuple(kpm.shape)}")
                kpm = kpm.view(bsz, 1, 1, src_len)
                mask = kpm if mask is None else mask + kpm

        q, k, v = self._project(query, key, value)
        h, d = self.num_heads, self.head_dim
        q = q.view(bsz, tgt_len, h, d).transpose(1, 2)
        k = k.view(bsz, src_len, h, d).transpose(1, 2)
        v = v.view(bsz, src_len, h, d).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = self.out_proj(out)
        if not is_batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)


def replace_attention(model: nn.Module) -> list[str]:
    """Replaces every nn.MultiheadAttention submodule of `model` by a FlashAttention with a copy of its weights
    (same device, dtype, training mode and requires_grad flags); returns the dotted names replaced.

    A module shared under several names is replaced by one shared FlashAttention, and every name is listed.
    Modules FlashAttention cannot represent (add_bias_kv, add_zero_attn) are left alone and logged. `model`
    itself is never replaced (use FlashAttention.from_multihead_attention for a bare nn.MultiheadAttention).
    """
    replacements: dict[int, nn.Module | None] = {}
    names: list[str] = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            if id(child) not in replacements:
                try:
                    replacements[id(child)] = FlashAttention.from_multihead_attention(child)
                except NotImplementedError as exc:
                    logger.warning("replace_attention: kept %s (%s)",
                                   f"{parent_name}.{child_name}" if parent_name else child_name, exc)
                    replacements[id(child)] = None
            new = replacements[id(child)]
            if new is None:
                continue
            setattr(parent, child_name, new)
            names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names
