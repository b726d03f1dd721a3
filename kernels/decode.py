"""Decode: a few new query tokens against a KV cache, split along the keys (flash-decoding).

The KV cache stays in the caller's order (re-sorting it every step would cost more
than the attention itself); only the few queries are sorted into domain-pure tiles of
``QT`` slots, and the query heads of one GQA group are packed into the rows of one
program so each K/V tile is read once per group. Each program walks one split of the
key tiles of its query tile: EMPTY tiles are skipped, FULL tiles need only the bounds
mask, PARTIAL tiles get the element mask (relation, causal, pattern) from the frozen constants. K/V rows the query
tile's domain may not read are never loaded. A second kernel merges the splits.

Causal alignment comes from the tokens' sequence indices (the layout's ``index``), so
new queries at positions N-q..N-1 see exactly the keys at indices <= their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import LN2, LOG2E, _online_step, dot_precision
from .masks import _key_readable, _pair_mask


@triton.jit
def _decode_kernel(
    Q, K, V, Opart, Mpart, Lpart,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    QTok, QDom, QIdx, QRank, KDom, KIdx, KRank, Kinds,
    Hq, Hkv, Sq, Nk, Tq, Tk, Hm, SPLITS, tiles_per_split,
    qk_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr,
    GROUP: tl.constexpr, QT: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    tl.static_assert(ROWS >= GROUP * QT, "ROWS must hold GROUP * QT rows")
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    t = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    r = tl.arange(0, ROWS)
    row_ok = r < GROUP * QT
    g = tl.where(row_ok, r // QT, 0)
    slot = t * QT + tl.where(row_ok, r % QT, 0)
    h = hk * GROUP + g  # [ROWS] query head of each row
    d = tl.arange(0, HEAD_DIM)
    q_tok = tl.load(QTok + b * Sq + slot)
    q_dom = tl.load(QDom + b * Sq + slot)
    q_idx = tl.load(QIdx + b * Sq + slot)
    if HAS_PAT:
        q_rank = tl.load(QRank + b * Sq + slot)
    else:
        q_rank = q_idx
    q_ok = (q_tok >= 0) & row_ok
    q_row = tl.where(q_ok, q_tok, 0).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + q_row[:, None] * sqn + d[None, :],
                mask=q_ok[:, None], other=0.0)
    # INVARIANT: query tiles are domain-pure (plan.sort_slots).
    tile_dom = tl.load(QDom + b * Sq + t * QT)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    # Heads of a group share one tile table (the kernels refuse head-dependent masks).
    kinds_row = Kinds + ((b * Hm) * Tq + t).to(tl.int64) * Tk
    kt0 = split * tiles_per_split
    kt1 = tl.minimum(kt0 + tiles_per_split, Tk)
    for kt in range(kt0, kt1):
        kind = tl.load(kinds_row + kt)
        if kind != 0:  # EMPTY tiles are never loaded
            cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            inb = cols < Nk
            k_dom = tl.load(KDom + b * Nk + cols, mask=inb, other=-1)
            readable = _key_readable(tile_dom, k_dom, REL, DP) & inb
            crow = tl.where(readable, cols, 0).to(tl.int64)
            k = tl.load(k_base + crow[:, None] * skn + d[None, :], mask=readable[:, None], other=0.0)
            v = tl.load(v_base + crow[:, None] * svn + d[None, :], mask=readable[:, None], other=0.0)
            if kind == 2:  # FULL: every pair of existing keys allowed; only the bounds mask
                allowed = readable[None, :] & row_ok[:, None]
            else:
                k_idx = tl.load(KIdx + b * Nk + cols, mask=inb, other=0)
                if HAS_PAT:
                    k_rank = tl.load(KRank + b * Nk + cols, mask=inb, other=0)
                else:
                    k_rank = k_idx
                allowed = _pair_mask(q_dom, q_idx, q_rank, k_dom, k_idx, k_rank, tile_dom, REL, CAUSAL, DP, PAT,
                                     HAS_PAT) & readable[None, :]
            acc, l_i, m_i = _online_step(acc, l_i, m_i, q, tl.trans(k), v, allowed, qk_scale, PREC)

    part = ((b * Hq + h).to(tl.int64) * Sq + slot) * SPLITS + split  # [ROWS]
    tl.store(Mpart + part, m_i, mask=row_ok)
    tl.store(Lpart + part, l_i, mask=row_ok)
    tl.store(Opart + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    Opart, Mpart, Lpart, O, Lse,
    sob, soh, son,
    QTok, Hq, Sq, Nq, SPLITS,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    slot = tl.program_id(0)
    b = pid_bh // Hq
    h = pid_bh % Hq
    tok = tl.load(QTok + b * Sq + slot)
    if tok >= 0:
        s = tl.arange(0, SPLITS_P2)
        s_ok = s < SPLITS
        base = ((b * Hq + h).to(tl.int64) * Sq + slot) * SPLITS
        m = tl.load(Mpart + base + s, mask=s_ok, other=float("-inf"))
        l = tl.load(Lpart + base + s, mask=s_ok, other=0.0)
        d = tl.arange(0, HEAD_DIM)
        o = tl.load(Opart + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_use))  # empty splits weigh exactly 0
        l_tot = tl.sum(w * l, 0)
        o_tot = tl.sum(tl.where(w[:, None] > 0.0, w[:, None] * o, 0.0), 0)
        empty = l_tot == 0.0
        l_safe = tl.where(empty, 1.0, l_tot)
        out = tl.where(empty, 0.0, o_tot / l_safe)
        lse = tl.where(empty, 0.0, (m_use + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + tok.to(tl.int64) * son + d,
                 out.to(O.dtype.element_ty))
        tl.store(Lse + (b * Hq + h).to(tl.int64) * Nq + tok, lse)


def decode_rows(group: int) -> tuple[int, int]:
    """(QT, ROWS): query slots per tile and packed rows (a power of two >= 16) for a GQA group size."""
    qt = max(1, 16 // group)
    rows = max(16, triton.next_power_of_2(group * qt))
    return qt, rows


def launch_decode(q, k, v, qs, k_dom, k_idx, k_rank, kinds, tables, scale, *, block_n, num_warps=4, num_stages=2,
                  splits=None):
    """q [B, Hq, Nq, D] (few tokens), k/v [B, Hkv, Nk, D] in the caller's order.

    ``qs``: query Slots padded to QT; ``k_dom``/``k_idx``/``k_rank`` int32 [B, Nk]; ``kinds`` uint8
    [B, Hm, Tq, Tk] over (QT, block_n) tiles. Returns (out [B, Hq, Nq, D], lse [B, Hq, Nq] natural log).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    qt, rows = decode_rows(group)
    hm, tq, tk = kinds.shape[1], kinds.shape[2], kinds.shape[3]
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        want = max(1, (2 * sms) // max(1, b * hkv * tq))
        splits = max(1, min(want, triton.cdiv(tk, 4)))
    per = triton.cdiv(tk, splits)
    splits = triton.cdiv(tk, per)
    sq = qs.size
    opart = torch.empty(b, hq, sq, splits, d, dtype=torch.float32, device=q.device)
    mpart = torch.empty(b, hq, sq, splits, dtype=torch.float32, device=q.device)
    lpart = torch.empty(b, hq, sq, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(splits, b * hkv, tq)](
        q, k, v, opart, mpart, lpart,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qs.tok, qs.dom, qs.idx, qs.rank, k_dom, k_idx, k_rank, kinds,
        hq, hkv, sq, nk, tq, tk, hm, splits, per,
        scale * LOG2E,
        REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp,
        PAT=tables.pattern_constants, HAS_PAT=tables.has_pattern, GROUP=group, QT=qt, ROWS=rows, HEAD_DIM=d, BLOCK_N=block_n, PREC=dot_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    _combine_kernel[(sq, b * hq)](
        opart, mpart, lpart, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        qs.tok, hq, sq, nq, splits,
        HEAD_DIM=d, SPLITS_P2=triton.next_power_of_2(splits),
    )
    return out, lse


def decode_reference(q, k, v, q_dom, q_idx, k_dom, k_idx, tables, scale, q_rank=None, k_rank=None):
    """PyTorch twin of ``launch_decode`` on per-token attributes (caller's order)."""
    from domainguard.attention import reference_from_mask

    from .masks import pair_mask_reference

    mask = pair_mask_reference(q_dom, q_idx, k_dom, k_idx, tables, q_rank, k_rank)
    out, lse = reference_from_mask(q, k, v, mask[:, None], scale=scale)
    return out, lse


__all__ = ["launch_decode", "decode_reference", "decode_rows", "LN2"]
