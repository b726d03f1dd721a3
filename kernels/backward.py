"""Backward guarded attention (dq, dk, dv) over allowed tiles only, in slot order.

Two kernels, no atomics: ``_dkdv_kernel`` owns a key tile and walks the query tiles
that may read it (the transposed tile lists), summing over the query heads of its
GQA group; ``_dq_kernel`` owns a query tile and walks its key tiles (the forward
lists). Inputs Q, dO, log-sum-exp (log2 units) and Delta = rowsum(O * dO) arrive in
slot order; gradients are scattered straight back to the caller's token order.

Exactness mirrors the forward: probabilities and dS of masked pairs are selected to
exactly 0, K/V rows a query tile may not read are never loaded in the dq kernel, and
in the dk/dv kernel the update of a key its query tile may not read is discarded by a
select (never by multiplying with 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import LOG2E, _dot, dot_precision
from .masks import _key_readable, _pair_mask, _readable_bits


@triton.jit
def _pair_mask_t(k_dom, k_idx, q_dom, q_idx, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr):
    """bool [BN, BM]: query q (column) may attend key k (row); the transpose of masks._pair_mask."""
    bits = _readable_bits(q_dom, REL, DP)  # [BM]
    kd = tl.minimum(tl.maximum(k_dom, 0), 63).to(tl.int64)
    ok = (((bits[None, :] >> kd[:, None]) & 1) != 0) & (k_dom[:, None] >= 0) & (k_dom[:, None] < DP)
    qd = tl.minimum(tl.maximum(q_dom, 0), 63).to(tl.int64)
    is_causal = ((q_dom.to(tl.int64) * 0 + CAUSAL) >> qd) & 1
    ok = ok & ((is_causal[None, :] == 0) | (k_idx[:, None] <= q_idx[None, :]))
    return ok


@triton.jit
def _dkdv_kernel(
    Qp, DOp, Lse2, Delta, Kp, Vp, DK, DV,
    sdkb, sdkh, sdkn,
    QDom, QIdx, KTok, KDom, KIdx,
    FullNum, FullIdx, PartNum, PartIdx,
    Hq, Hkv, Sq, Sk, Tq, Tk, Hm,
    qk_scale, sm_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, SUB_M: tl.constexpr,
    PREC: tl.constexpr,
):
    tl.static_assert(BLOCK_N % SUB_N == 0, "SUB_N must divide BLOCK_N")
    tl.static_assert(BLOCK_M % SUB_M == 0, "SUB_M must divide BLOCK_M")
    pid_bh = tl.program_id(0)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    pid_n = tl.program_id(1)
    u = pid_n // (BLOCK_N // SUB_N)  # key tile of the tile lists
    cols = pid_n * SUB_N + tl.arange(0, SUB_N)
    d = tl.arange(0, HEAD_DIM)
    kv_off = (b * Hkv + hk).to(tl.int64) * Sk * HEAD_DIM
    k = tl.load(Kp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
    v = tl.load(Vp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
    k_dom = tl.load(KDom + b * Sk + cols)
    k_idx = tl.load(KIdx + b * Sk + cols)
    dk = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        hm = h % Hm
        q_off = (b * Hq + h).to(tl.int64) * Sq
        lrow = ((b * Hm + hm) * Tk + u).to(tl.int64)
        n_full = tl.load(FullNum + lrow)
        for j in range(n_full):
            t = tl.load(FullIdx + lrow * Tq + j)
            for sub in range(BLOCK_M // SUB_M):
                rows = t * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
                q = tl.load(Qp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
                do = tl.load(DOp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
                lse2 = tl.load(Lse2 + q_off + rows)
                delta = tl.load(Delta + q_off + rows)
                pt = tl.math.exp2(_dot(k, tl.trans(q), None, PREC) * qk_scale - lse2[None, :])  # [SUB_N, SUB_M]
                dv = dv + _dot(pt.to(do.dtype), do, None, PREC)
                dpt = _dot(v, tl.trans(do), None, PREC)
                dst = pt * (dpt - delta[None, :])
                dk = dk + _dot(dst.to(q.dtype), q, None, PREC)
        n_part = tl.load(PartNum + lrow)
        for j in range(n_part):
            t = tl.load(PartIdx + lrow * Tq + j)
            # INVARIANT: query tiles are domain-pure; one domain decides readability of each key.
            readable = _key_readable(tl.load(QDom + b * Sq + t * BLOCK_M), k_dom, REL, DP)
            for sub in range(BLOCK_M // SUB_M):
                rows = t * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
                q = tl.load(Qp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
                do = tl.load(DOp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
                lse2 = tl.load(Lse2 + q_off + rows)
                delta = tl.load(Delta + q_off + rows)
                q_dom = tl.load(QDom + b * Sq + rows)
                q_idx = tl.load(QIdx + b * Sq + rows)
                allowed = _pair_mask_t(k_dom, k_idx, q_dom, q_idx, REL, CAUSAL, DP) & readable[:, None]
                st = tl.where(allowed, _dot(k, tl.trans(q), None, PREC), float("-inf"))
                pt = tl.where(allowed, tl.math.exp2(st * qk_scale - lse2[None, :]), 0.0)
                dv_up = _dot(pt.to(do.dtype), do, None, PREC)
                dpt = _dot(v, tl.trans(do), None, PREC)
                dst = tl.where(allowed, pt * (dpt - delta[None, :]), 0.0)
                dk_up = _dot(dst.to(q.dtype), q, None, PREC)
                # A key this tile may not read keeps its gradient untouched (no 0 * NaN).
                dv = dv + tl.where(readable[:, None], dv_up, 0.0)
                dk = dk + tl.where(readable[:, None], dk_up, 0.0)
    k_tok = tl.load(KTok + b * Sk + cols)
    ok = k_tok >= 0
    row = tl.where(ok, k_tok, 0).to(tl.int64)
    base = b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + row[:, None] * sdkn + d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _dq_kernel(
    Qp, DOp, Lse2, Delta, Kp, Vp, DQ,
    sdqb, sdqh, sdqn,
    QTok, QDom, QIdx, KDom, KIdx,
    FullNum, FullIdx, PartNum, PartIdx,
    Hq, Hkv, Sq, Sk, Tq, Tk, Hm,
    qk_scale, sm_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
    PREC: tl.constexpr,
):
    tl.static_assert(BLOCK_M % SUB_M == 0, "SUB_M must divide BLOCK_M")
    tl.static_assert(BLOCK_N % SUB_N == 0, "SUB_N must divide BLOCK_N")
    pid_bh = tl.program_id(0)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    hm = h % Hm
    pid_m = tl.program_id(1)
    t = pid_m // (BLOCK_M // SUB_M)
    rows = pid_m * SUB_M + tl.arange(0, SUB_M)
    d = tl.arange(0, HEAD_DIM)
    q_off = (b * Hq + h).to(tl.int64) * Sq
    q = tl.load(Qp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    do = tl.load(DOp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    lse2 = tl.load(Lse2 + q_off + rows)
    delta = tl.load(Delta + q_off + rows)
    q_dom = tl.load(QDom + b * Sq + rows)
    q_idx = tl.load(QIdx + b * Sq + rows)
    # INVARIANT: query tiles are domain-pure (plan.sort_slots).
    tile_dom = tl.load(QDom + b * Sq + t * BLOCK_M)
    kv_off = (b * Hkv + hk).to(tl.int64) * Sk * HEAD_DIM
    dq = tl.zeros([SUB_M, HEAD_DIM], dtype=tl.float32)
    lrow = ((b * Hm + hm) * Tq + t).to(tl.int64)
    n_full = tl.load(FullNum + lrow)
    for j in range(n_full):
        u = tl.load(FullIdx + lrow * Tk + j)
        for sub in range(BLOCK_N // SUB_N):
            cols = u * BLOCK_N + sub * SUB_N + tl.arange(0, SUB_N)
            k = tl.load(Kp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
            v = tl.load(Vp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
            p = tl.math.exp2(_dot(q, tl.trans(k), None, PREC) * qk_scale - lse2[:, None])
            dp = _dot(do, tl.trans(v), None, PREC)
            ds = p * (dp - delta[:, None])
            dq = dq + _dot(ds.to(k.dtype), k, None, PREC)
    n_part = tl.load(PartNum + lrow)
    for j in range(n_part):
        u = tl.load(PartIdx + lrow * Tk + j)
        for sub in range(BLOCK_N // SUB_N):
            cols = u * BLOCK_N + sub * SUB_N + tl.arange(0, SUB_N)
            k_dom = tl.load(KDom + b * Sk + cols)
            k_idx = tl.load(KIdx + b * Sk + cols)
            readable = _key_readable(tile_dom, k_dom, REL, DP)
            k = tl.load(Kp + kv_off + cols[:, None] * HEAD_DIM + d[None, :], mask=readable[:, None], other=0.0)
            v = tl.load(Vp + kv_off + cols[:, None] * HEAD_DIM + d[None, :], mask=readable[:, None], other=0.0)
            allowed = _pair_mask(q_dom, q_idx, k_dom, k_idx, REL, CAUSAL, DP) & readable[None, :]
            s = tl.where(allowed, _dot(q, tl.trans(k), None, PREC), float("-inf"))
            p = tl.where(allowed, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), None, PREC)
            ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
            dq = dq + _dot(ds.to(k.dtype), k, None, PREC)
    q_tok = tl.load(QTok + b * Sq + rows)
    ok = q_tok >= 0
    row = tl.where(ok, q_tok, 0).to(tl.int64)
    base = b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + row[:, None] * sdqn + d[None, :]
    tl.store(DQ + base, (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])


def launch_backward(
    qp, dop, lse2, delta, kp, vp, dq, dk, dv, qs, ks, lists, lists_t, tables, scale,
    *, block_m, block_n, dkdv_cfg, dq_cfg,
):
    """Fill dq [B, Hq, Nq, D], dk/dv [B, Hkv, Nk, D] (caller's order) from slot-order inputs.

    dkdv_cfg / dq_cfg: dicts with SUB_N, SUB_M, num_warps, num_stages.
    """
    b, hq, sq, d = qp.shape
    hkv, sk = kp.shape[1], kp.shape[2]
    full_num, full_idx, part_num, part_idx = lists
    full_num_t, full_idx_t, part_num_t, part_idx_t = lists_t
    hm = full_num.shape[1]
    tq, tk = full_num.shape[2], full_num_t.shape[2]
    common = dict(REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp, GROUP=hq // hkv,
                  HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, PREC=dot_precision(qp))
    c = dict(dkdv_cfg)
    grid = (b * hkv, sk // c["SUB_N"])
    _dkdv_kernel[grid](
        qp, dop, lse2, delta, kp, vp, dk, dv,
        dk.stride(0), dk.stride(1), dk.stride(2),
        qs.dom, qs.idx, ks.tok, ks.dom, ks.idx,
        full_num_t, full_idx_t, part_num_t, part_idx_t,
        hq, hkv, sq, sk, tq, tk, hm,
        scale * LOG2E, scale,
        SUB_N=c["SUB_N"], SUB_M=c["SUB_M"], num_warps=c["num_warps"], num_stages=c["num_stages"], **common,
    )
    c = dict(dq_cfg)
    grid = (b * hq, sq // c["SUB_M"])
    _dq_kernel[grid](
        qp, dop, lse2, delta, kp, vp, dq,
        dq.stride(0), dq.stride(1), dq.stride(2),
        qs.tok, qs.dom, qs.idx, ks.dom, ks.idx,
        full_num, full_idx, part_num, part_idx,
        hq, hkv, sq, sk, tq, tk, hm,
        scale * LOG2E, scale,
        SUB_M=c["SUB_M"], SUB_N=c["SUB_N"], num_warps=c["num_warps"], num_stages=c["num_stages"], **common,
    )
