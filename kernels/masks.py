"""Element masks shared by every kernel, and their PyTorch reference.

The relation arrives as compile-time constants (``REL``: one 64-bit word per reader,
``CAUSAL``: one bit per reader), never as a tensor, so a launched kernel cannot be
made to apply a wider relation than the one it was specialised for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _readable_bits(dom, REL: tl.constexpr, DP: tl.constexpr):
    """64-bit mask of the source ids readers of ``dom`` may read (any shape; 0 for unknown ids)."""
    bits = dom.to(tl.int64) * 0
    for r in tl.static_range(DP):
        bits = tl.where(dom == r, REL[r], bits)
    return bits


@triton.jit
def _domain_pair_allowed(q_dom, k_dom, REL: tl.constexpr, DP: tl.constexpr):
    """Scalar: the frozen relation lets readers of ``q_dom`` read ``k_dom``."""
    bits = _readable_bits(q_dom, REL, DP)
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    return (((bits >> kd) & 1) != 0) & (k_dom >= 0) & (k_dom < DP)


@triton.jit
def _key_readable(q_dom, k_dom, REL: tl.constexpr, DP: tl.constexpr):
    """bool [BN]: keys of ids ``k_dom`` [BN] readable by the (scalar) query domain ``q_dom``.

    Ids outside 0..DP-1 (never produced by the wrapper) read as not readable.
    """
    bits = _readable_bits(q_dom, REL, DP)
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    return (((bits >> kd) & 1) != 0) & (k_dom >= 0) & (k_dom < DP)


@triton.jit
def _pair_mask(q_dom, q_idx, k_dom, k_idx, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr):
    """bool [BM, BN]: relation[q_dom, k_dom] AND (causal → k_idx <= q_idx)."""
    bits = _readable_bits(q_dom, REL, DP)  # [BM]
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    ok = (((bits[:, None] >> kd[None, :]) & 1) != 0) & (k_dom[None, :] >= 0) & (k_dom[None, :] < DP)
    qd = tl.minimum(tl.maximum(q_dom, 0), 63).to(tl.int64)
    is_causal = ((q_dom.to(tl.int64) * 0 + CAUSAL) >> qd) & 1
    ok = ok & ((is_causal[:, None] == 0) | (k_idx[None, :] <= q_idx[:, None]))
    return ok


def pair_mask_reference(q_dom, q_idx, k_dom, k_idx, rel_bits: tuple[int, ...], causal_bits: int) -> torch.Tensor:
    """PyTorch twin of ``_pair_mask``: bool [..., Nq, Nk] from per-token attributes."""
    dp = len(rel_bits)
    rel = torch.tensor([[(rel_bits[r] >> s) & 1 for s in range(dp)] for r in range(dp)], dtype=torch.bool)
    causal = torch.tensor([(causal_bits >> r) & 1 for r in range(dp)], dtype=torch.bool)
    rel, causal = rel.to(q_dom.device), causal.to(q_dom.device)
    qd, kd = q_dom.long().clamp(0, dp - 1), k_dom.long().clamp(0, dp - 1)
    ok = rel[qd[..., :, None], kd[..., None, :]]
    ok &= ((q_dom >= 0) & (q_dom < dp))[..., :, None] & ((k_dom >= 0) & (k_dom < dp))[..., None, :]
    ok &= ~causal[qd][..., :, None] | (k_idx[..., None, :] <= q_idx[..., :, None])
    return ok
