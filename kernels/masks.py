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
    """The frozen relation lets readers of ``q_dom`` read ``k_dom`` (scalars, or either a vector;
    ids outside 0..DP-1 read as not allowed)."""
    bits = _readable_bits(q_dom, REL, DP)
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    return (((bits >> kd) & 1) != 0) & (k_dom >= 0) & (k_dom < DP)


@triton.jit
def _key_readable(q_dom, k_dom, REL: tl.constexpr, DP: tl.constexpr):
    """bool [BN]: keys of ids ``k_dom`` [BN] readable by the (scalar) query domain ``q_dom``.

    Ids outside 0..DP-1 (never produced by the wrapper) read as not readable.
    """
    return _domain_pair_allowed(q_dom, k_dom, REL, DP)


@triton.jit
def _link_target(qi, j_term, seed_term):
    """``patterns.link_hash(seed, qi, j) % (qi + 1)`` for ``qi`` >= 0 (int32 in and out; int64
    inside, where every product stays below 2**62), given the seed's and the link number's terms."""
    q = qi.to(tl.int64)
    x = (q & 0x7FFFFFFF) * 0x2C1B3C6D % 2147483648
    x = (x + seed_term.to(tl.int64) + j_term) & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x7FEB352D) & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x4695AF5B) & 0x7FFFFFFF
    x = x ^ (x >> 16)
    return (x % (q + 1)).to(tl.int32)


@triton.jit
def _col(x, T: tl.constexpr):
    """A per-query vector as the [BM, 1] operand (or [1, BM] when ``T``: transposed masks)."""
    if T:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _row(x, T: tl.constexpr):
    """A per-key vector as the [1, BN] operand (or [BN, 1] when ``T``)."""
    if T:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _pattern_keep(p_dom, q_idx, q_rank, k_idx, k_rank, PAT: tl.constexpr, DP: tl.constexpr, T: tl.constexpr):
    """bool [BM, BN] ([BN, BM] when ``T``): the union parts of domain ``p_dom``'s pattern keep
    the pair (True if it has none). Mirrors ``patterns.MaskRule.mask``; ``causal`` is applied
    by the caller. ``p_dom`` is a scalar: the kernels pass the query tile's domain (tiles are
    domain-pure), so the pattern's parameters are scalars; parts no domain uses are compiled
    out (``PAT``'s last constant) and per-pair work stays in int32."""
    reach, dil, stride, block, hubs, links, seed_term = 0, 0, 0, 0, 0, 0, 0
    for r in tl.static_range(DP):
        sel = p_dom == r
        reach = tl.where(sel, PAT[7 * r + 0], reach)
        dil = tl.where(sel, PAT[7 * r + 1], dil)
        stride = tl.where(sel, PAT[7 * r + 2], stride)
        block = tl.where(sel, PAT[7 * r + 3], block)
        hubs = tl.where(sel, PAT[7 * r + 4], hubs)
        links = tl.where(sel, PAT[7 * r + 5], links)
        seed_term = tl.where(sel, PAT[7 * r + 6], seed_term)
    USED: tl.constexpr = tl.constexpr(PAT[7 * DP + 1])  # bits: 1 window, 2 dilation, 4 stride, 8 block, 16 hubs
    qi = q_idx.to(tl.int32)
    ki = k_idx.to(tl.int32)
    delta = _col(qi, T) - _row(ki, T)
    none = (dil == 0) & (stride == 0) & (block == 0) & (hubs == 0) & (links == 0)
    keep = (delta == delta) & none
    if USED & 3:
        # window: |delta| < reach (0: unbounded); dilation: delta = 0 mod dil
        win = (delta == delta) & (dil > 0)
        if USED & 1:
            win = win & ((reach == 0) | ((delta < reach) & (-delta < reach)))
        if USED & 2:
            win = win & ((delta % tl.maximum(dil, 1)) == 0)
        keep = keep | win
    if USED & 4:
        keep = keep | ((stride > 0) & ((delta % tl.maximum(stride, 1)) == 0))
    if USED & 8:
        bsz = tl.maximum(block, 1)
        keep = keep | ((block > 0) & (_col(qi // bsz, T) == _row(tl.maximum(ki, 0) // bsz, T)))
    if USED & 16:
        keep = keep | ((hubs > 0) & ((_col(q_rank, T) < hubs) | (_row(k_rank, T) < hubs)))
    q0 = tl.maximum(qi, 0)
    for j in tl.static_range(tl.constexpr(PAT[7 * DP])):  # the most links any domain has
        target = _link_target(q0, (j * 0x6C8E9CF5) % 2147483648, seed_term)
        keep = keep | ((links > j) & (_row(ki, T) == _col(target, T)))
    return keep


@triton.jit
def _pair_mask(q_dom, q_idx, q_rank, k_dom, k_idx, k_rank, p_dom,
               REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr):
    """bool [BM, BN]: relation[q_dom, k_dom] AND (causal → k_idx <= q_idx) AND the pattern of
    ``p_dom`` (the query tile's domain; only when ``HAS_PAT``, and ranks are read only then)."""
    bits = _readable_bits(q_dom, REL, DP)  # [BM]
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    ok = (((bits[:, None] >> kd[None, :]) & 1) != 0) & (k_dom[None, :] >= 0) & (k_dom[None, :] < DP)
    qd = tl.minimum(tl.maximum(q_dom, 0), 63).to(tl.int64)
    is_causal = ((q_dom.to(tl.int64) * 0 + CAUSAL) >> qd) & 1
    ok = ok & ((is_causal[:, None] == 0) | (k_idx[None, :] <= q_idx[:, None]))
    if HAS_PAT:
        ok = ok & _pattern_keep(p_dom, q_idx, q_rank, k_idx, k_rank, PAT, DP, False)
    return ok


@triton.jit
def _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL: tl.constexpr, DP: tl.constexpr,
               PAT: tl.constexpr, HAS_PAT: tl.constexpr, T: tl.constexpr):
    """bool [BM, BN] ([BN, BM] when ``T``): what the kernels apply inside a query tile of domain
    ``tile_dom`` (scalar; query tiles are domain-pure): keys the relation lets that domain read
    (``readable`` [BN], from ``_key_readable``), rows of that domain only (``row_ok`` [BM]: a row
    of another domain reads nothing), causality if the domain is causal, and its pattern. For rows
    of ``tile_dom`` this equals ``_pair_mask``."""
    causal = (CAUSAL >> tl.minimum(tl.maximum(tile_dom, 0), 63).to(tl.int64)) & 1
    ok = (_row(readable, T) & _col(row_ok, T)) & ((_row(k_idx, T) <= _col(q_idx, T)) | (causal == 0))
    if HAS_PAT:
        ok = ok & _pattern_keep(tile_dom, q_idx, q_rank, k_idx, k_rank, PAT, DP, T)
    return ok


def _link_target_reference(qi: torch.Tensor, j: int, seed_term: torch.Tensor) -> torch.Tensor:
    m31 = (1 << 31) - 1
    x = (qi & m31) * 0x2C1B3C6D % (1 << 31)
    x = (x + seed_term + (j * 0x6C8E9CF5) % (1 << 31)) & m31
    for mult in (0x7FEB352D, 0x4695AF5B):
        x = ((x ^ (x >> 15)) * mult) & m31
    return (x ^ (x >> 16)) % (qi + 1)


def pair_mask_reference(q_dom, q_idx, k_dom, k_idx, tables, q_rank=None, k_rank=None) -> torch.Tensor:
    """PyTorch twin of ``_pair_mask``: bool [..., Nq, Nk] from per-token attributes and the
    frozen constants of ``tables`` (ranks are needed only for a pattern with global tokens)."""
    rel_bits, causal_bits, dp = tables.rel_bits, tables.causal_bits, tables.dp
    rel = torch.tensor([[(rel_bits[r] >> s) & 1 for s in range(dp)] for r in range(dp)], dtype=torch.bool)
    causal = torch.tensor([(causal_bits >> r) & 1 for r in range(dp)], dtype=torch.bool)
    rel, causal = rel.to(q_dom.device), causal.to(q_dom.device)
    qd, kd = q_dom.long().clamp(0, dp - 1), k_dom.long().clamp(0, dp - 1)
    ok = rel[qd[..., :, None], kd[..., None, :]]
    ok &= ((q_dom >= 0) & (q_dom < dp))[..., :, None] & ((k_dom >= 0) & (k_dom < dp))[..., None, :]
    ok &= ~causal[qd][..., :, None] | (k_idx[..., None, :] <= q_idx[..., :, None])
    if not tables.has_pattern:
        return ok
    pat = torch.tensor(tables.pattern_constants[:-2], dtype=torch.long, device=q_dom.device).view(dp, 7)[qd]
    reach, dil, stride, block, hubs, links, seed_term = (pat[..., i, None] for i in range(7))  # [..., Nq, 1]
    qi, ki = q_idx.long()[..., :, None], k_idx.long()[..., None, :]
    delta = qi - ki
    keep = ((dil == 0) & (stride == 0) & (block == 0) & (hubs == 0) & (links == 0)).expand_as(delta)
    keep = keep | ((dil > 0) & ((reach == 0) | (delta.abs() < reach)) & (delta.remainder(dil.clamp(min=1)) == 0))
    keep = keep | ((stride > 0) & (delta.remainder(stride.clamp(min=1)) == 0))
    keep = keep | ((block > 0) & (qi.div(block.clamp(min=1), rounding_mode="floor") == ki.clamp(min=0).div(block.clamp(min=1), rounding_mode="floor")))
    if bool((hubs > 0).any()):
        keep = keep | ((hubs > 0) & ((q_rank.long()[..., :, None] < hubs) | (k_rank.long()[..., None, :] < hubs)))
    q0 = qi.clamp(min=0)
    for j in range(int(links.max()) if links.numel() else 0):
        keep = keep | ((j < links) & (ki == _link_target_reference(q0, j, seed_term)))
    return ok & keep
