"""``nn.MultiheadAttention`` with its projections on the sparse path.

torch's attention forward (``F.multi_head_attention_forward``) reads the packed input
projection weight and the output projection weight itself, so the sparse products cannot be
slipped under it. :func:`forward` computes the same thing as its slow path, step for step,
with the input projection from the kept weights of ``in_proj_weight`` where the layer's
path is sparse (one product for self-attention, one per row block of ``q``, ``k`` and ``v``
otherwise) and the output projection through the layer's ``out_proj`` (sparse or dense by
its own path); the attention itself is torch's (``scaled_dot_product_attention``, or the
explicit softmax where the attention weights are asked for). Layers with
``bias_k``/``bias_v``, ``add_zero_attn`` or separate ``q``/``k``/``v`` weights take torch's
own forward, and their output projection runs dense (:func:`dpf_ext.nn.set_compute`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from . import compute
from ..ops import sparse_linear


def _projections(layer, query, key, value):
    """``q, k, v`` of ``query``, ``key``, ``value`` (sequence first) through the packed input
    projection: from its kept weights where the layer's path is sparse, else densely."""
    bias, embed = layer.in_proj_bias, layer.embed_dim
    if not compute.runs_sparse(layer):
        weight = layer.masked_weight()
        if query is key and key is value:
            return F.linear(query, weight, bias).chunk(3, dim=-1)
        return [F.linear(x, weight[i * embed:(i + 1) * embed],
                         None if bias is None else bias[i * embed:(i + 1) * embed])
                for i, x in enumerate((query, key, value))]
    weight, dense_grad = compute.sparse_weight(layer)
    if query is key and key is value:
        return sparse_linear(query, weight, compute.sparse_index(layer), bias,
                             dense_grad).chunk(3, dim=-1)
    out = []
    for i, x in enumerate((query, key, value)):
        rows = slice(i * embed, (i + 1) * embed)
        out.append(sparse_linear(x, weight[rows], compute.sparse_index(layer, rows),
                                 None if bias is None else bias[rows], dense_grad))
    return out


def _same(fn, query, key, value):
    """``fn`` of each, keeping which of them are one tensor (self-attention's one product)."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else q if value is query else fn(value)
    return q, k, v


def forward(layer, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False):
    """``layer(query, key, value, ...)`` (an ``nn.MultiheadAttention`` whose configuration
    :func:`dpf_ext.nn.compute.unsupported` accepts) with the projections' products from the
    kept weights: ``(output, attention weights or None)`` as torch's forward returns them."""
    batched = query.dim() == 3
    if layer.batch_first and batched:
        query, key, value = _same(lambda t: t.transpose(0, 1), query, key, value)
    if not batched:
        query, key, value = _same(lambda t: t.unsqueeze(1), query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed = query.shape
    src_len, heads = key.shape[0], layer.num_heads
    head_dim = embed // heads
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention's own causal mask
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    q, k, v = _projections(layer, query, key, value)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(
            -1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = layer.dropout if layer.training else 0.0
    if need_weights:
        scores = torch.bmm(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed)
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else
                         attn_mask.view(bsz, heads, -1, src_len))
        out = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
            v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed)
        weights = None
    out = layer.out_proj(out).view(tgt_len, bsz, -1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    elif layer.batch_first:
        out = out.transpose(0, 1)
    return out, weights

