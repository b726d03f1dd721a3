"""Backward guarded attention (dq, dk, dv) over allowed tiles only, in slot order.

Two kernels, no atomics: ``_dkdv_kernel`` owns a key tile and walks the query tiles
that may read it (the transposed tile lists), summing over the query heads of its
GQA group; ``_dq_kernel`` owns a query tile and walks its key tiles (the forward
lists). Inputs Q, dO, log-sum-exp (log2 units) and Delta = rowsum(O * dO) arrive in
slot order; gradients are scattered straight back to the caller's token order.

Exactness mirrors the forward: probabilities and dS of masked pairs are selected to
exactly 0 (a NaN in an unreadable key's V reaches only its own column of dP, which the
select drops); in the dq kernel K rows the query tile may not read are replaced by zeros
before dS @ K unless the table check run on the same tables just before it
(``forward._query_trust``) has read the key domain of every tile the run tables list and
found it readable, and every slot of every PARTIAL tile listed and found it of its tile's
domain or padding (then every key is readable or a zero padding row: for FULL tiles because
check_plan has found key tiles domain-pure, for PARTIAL ones by that reading, and those mask
padding by its index alone), and a query tile whose rows are not all of its first row's
domain runs masked with the foreign rows reading nothing. The dk/dv kernel mirrors this from
the key side: its key block runs a FULL query tile unmasked only if the block's keys are all
of one domain and (with the table check on, ``check_full``) ``_key_trust``, run just
before it, has read every row's domain of every query tile the key-major tables list, found
each tile domain-pure and, for FULL tiles, its domain allowed to read the key tile; a PARTIAL
run skips the row select only if that check found its query tiles all pure (readability is
masked per key there). Otherwise the tiles run masked, with Q and dO rows of another domain
than their tile's replaced by zeros before the products (they sum over query rows), and the
update of a key its query tile may not read is discarded by a select (never by multiplying
with 0). Both checks run in one launch of their own (``_bwd_checks_kernel``), one program per
(batch, mask head, tile), so heads that share a mask check once; it is launched by
``launch_backward`` itself, on the tables it passes on, before dk/dv and dq, so no caller can
skip it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .forward import (
    LOG2E, _dot, _group_for_kv, _key_attrs, _masked_run, _query_trust, _runs_outside, _schedule, _sm90,
    dot_precision, pick_head_group,
)
from .masks import _domain_pair_allowed, _key_readable, _tile_mask


@triton.jit
def _dkdv_step(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0, row0, k_dom, k_idx, k_rank,
               readable, q_tile_dom, qk_scale, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr,
               HAS_PAT: tl.constexpr, HEAD_DIM: tl.constexpr, SUB_M: tl.constexpr, MASKED: tl.constexpr,
               SELECT_Q: tl.constexpr, PREC: tl.constexpr):
    """Add the contribution of query slots [row0, row0 + SUB_M) to dk, dv [SUB_N, D] of a key block.

    ``MASKED``: pairs allowed by the relation of ``q_tile_dom`` (the query tile's domain),
    causality and pattern only; ``SELECT_Q``: Q and dO rows of another domain than
    ``q_tile_dom`` are replaced by zeros first (the products sum over query rows, so a
    masked-out row's NaN would otherwise reach every key of the block as ``0 * NaN``)."""
    d = tl.arange(0, HEAD_DIM)
    rows = row0 + tl.arange(0, SUB_M)
    q = tl.load(Qp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    do = tl.load(DOp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    lse2 = tl.load(Lse2 + q_off + rows)
    delta = tl.load(Delta + q_off + rows)
    st = _dot(k, tl.trans(q), None, PREC)  # [SUB_N, SUB_M]
    # dP^T next to S^T, before the softmax: on an H100 (Triton 3.6) dk/dv 5-9% faster at 8K, 0-5% at
    # 32K in bf16 (spills 72 -> 58 bytes) and up to 4% in fp32 than with dP^T after dV's product. A
    # row selected away below still meets dO unselected here; its dS is replaced by 0 (``allowed``).
    dpt = _dot(v, tl.trans(do), None, PREC)
    if MASKED:
        q_idx = tl.load(QIdx + qslot0 + rows)
        if HAS_PAT:
            q_rank = tl.load(QRank + qslot0 + rows)
        else:
            q_rank = q_idx
        # Relation of the query tile's domain (``readable``); rows of another domain (never in a
        # checked plan) read nothing. Without ``SELECT_Q`` the kernel has found every row of the
        # tile of its domain (``_key_trust``), so no row's domain is loaded again.
        if SELECT_Q:
            row_ok = tl.load(QDom + qslot0 + rows) == q_tile_dom
            q = tl.where(row_ok[:, None], q, 0.0)
            do = tl.where(row_ok[:, None], do, 0.0)
        else:
            row_ok = rows >= 0
        allowed = _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, q_tile_dom, CAUSAL, DP, PAT, HAS_PAT, True)
        pt = tl.where(allowed, tl.math.exp2(tl.where(allowed, st, float("-inf")) * qk_scale - lse2[None, :]), 0.0)
    else:
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    dv_up = _dot(pt.to(do.dtype), do, None, PREC)
    dst = pt * (dpt - delta[None, :])
    if MASKED:
        dst = tl.where(allowed, dst, 0.0)
    dk_up = _dot(dst.to(q.dtype), q, None, PREC)
    if MASKED:
        # A key this tile may not read keeps its gradient untouched (no 0 * NaN).
        dv = dv + tl.where(readable[:, None], dv_up, 0.0)
        dk = dk + tl.where(readable[:, None], dk_up, 0.0)
    else:
        dv = dv + dv_up
        dk = dk + dk_up
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Qp, DOp, Lse2, Delta, Kp, Vp, DK, DV,
    sdkb, sdkh, sdkn,
    QDom, QIdx, QRank, KTok, KDom, KIdx, KRank,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd, Order, Trust,
    Hq, Hkv, Sq, Sk, Tk, RF, RP, Hm, HG,
    qk_scale, sm_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, SUB_M: tl.constexpr, FULL_M: tl.constexpr,
    FULL_STAGES: tl.constexpr, PREC: tl.constexpr,
):
    tl.static_assert(BLOCK_N % SUB_N == 0, "SUB_N must divide BLOCK_N")
    tl.static_assert(BLOCK_M % SUB_M == 0, "SUB_M must divide BLOCK_M")
    tl.static_assert(BLOCK_M % FULL_M == 0, "FULL_M must divide BLOCK_M")
    # Key blocks of the key tiles in Order (heaviest first), KV heads in groups of HG (``_schedule``):
    # programs running together share at most HG heads' Q/dO in L2.
    b = tl.program_id(1)
    rank, hk = _schedule(tl.program_id(0), Sk // SUB_N, HG)
    u = tl.load(Order + b * Tk + rank // (BLOCK_N // SUB_N))  # key tile of the run tables
    pid_n = u * (BLOCK_N // SUB_N) + rank % (BLOCK_N // SUB_N)
    cols = pid_n * SUB_N + tl.arange(0, SUB_N)
    d = tl.arange(0, HEAD_DIM)
    kv_off = (b * Hkv + hk).to(tl.int64) * Sk * HEAD_DIM
    k = tl.load(Kp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
    v = tl.load(Vp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
    k_dom = tl.load(KDom + b * Sk + cols)
    k_idx = tl.load(KIdx + b * Sk + cols)
    if HAS_PAT:
        k_rank = tl.load(KRank + b * Sk + cols)
    else:
        k_rank = k_idx
    k_tile_dom = tl.load(KDom + b * Sk + u * BLOCK_N)
    # Key tiles are domain-pure, and a FULL one holds no padding slot: a block of keys that are
    # not all of its tile's first domain (a plan altered after its check) never runs unmasked.
    key_pure = tl.sum((k_dom != k_tile_dom).to(tl.int32)) == 0
    qslot0 = b * Sq
    dk = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        hm = h % Hm
        q_off = (b * Hq + h).to(tl.int64) * Sq
        lrow = ((b * Hm + hm) * Tk + u).to(tl.int64)
        FS = FullStart + lrow * RF
        FE = FullEnd + lrow * RF
        PS = PartStart + lrow * RP
        PE = PartEnd + lrow * RP
        n_full = tl.load(FullRuns + lrow)
        n_part = tl.load(PartRuns + lrow)
        # What these run tables may be trusted with (``_key_trust``, run on them just before).
        n_fast = tl.where(key_pure & (tl.load(Trust + lrow * 2) != 0), n_full, 0)
        n_part_fast = tl.where(tl.load(Trust + lrow * 2 + 1) != 0, n_part, 0)
        for r in range(n_fast):
            t0 = tl.load(FS + r)
            t1 = tl.load(FE + r)
            # One flat loop over the run's query slots in steps of FULL_M (not tile, then rows):
            # the pipeline fills once per run instead of once per 128-query tile. H100: dk/dv 4-7%
            # faster at 8K-64K (BENCHMARKS.md).
            for row0 in tl.range(t0 * BLOCK_M, t1 * BLOCK_M, FULL_M, num_stages=FULL_STAGES):
                dk, dv = _dkdv_step(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0, row0,
                                    k_dom, k_idx, k_rank, None, None, qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT,
                                    HEAD_DIM, FULL_M, False, False, PREC)
        for r in range(n_part_fast):
            # PARTIAL runs whose query tiles were all found domain-pure: no row select needed.
            dk, dv = _dkdv_masked_run(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0,
                                      tl.load(PS + r), tl.load(PE + r), k_dom, k_idx, k_rank, qk_scale, REL, CAUSAL,
                                      DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_M, SUB_M, False, PREC)
        # Untrusted: the FULL runs not taken above, then the PARTIAL runs not taken above, all
        # masked, rows selected.
        n_slow_full = n_full - n_fast
        for r in range(n_slow_full + n_part - n_part_fast):
            t0, t1 = _masked_run(r, n_slow_full, FS, FE, PS, PE, Sq // BLOCK_M)
            dk, dv = _dkdv_masked_run(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0, t0, t1,
                                      k_dom, k_idx, k_rank, qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_M,
                                      SUB_M, True, PREC)
    k_tok = tl.load(KTok + b * Sk + cols)
    ok = k_tok >= 0
    row = tl.where(ok, k_tok, 0).to(tl.int64)
    base = b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + row[:, None] * sdkn + d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _dkdv_masked_run(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0, t0, t1, k_dom, k_idx,
                     k_rank, qk_scale, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr,
                     HAS_PAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr,
                     SELECT_Q: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [t0, t1) on the masked path: each tile's first slot names its domain, whose
    relation decides which keys are readable; rows of another domain read nothing."""
    for t in range(t0, t1):
        q_tile_dom = tl.load(QDom + qslot0 + t * BLOCK_M)
        readable = _key_readable(q_tile_dom, k_dom, REL, DP)
        for sub in range(BLOCK_M // SUB_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Qp, DOp, Lse2, Delta, QDom, QIdx, QRank, q_off, qslot0,
                                t * BLOCK_M + sub * SUB_M, k_dom, k_idx, k_rank, readable, q_tile_dom, qk_scale, REL,
                                CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, SUB_M, True, SELECT_Q, PREC)
    return dk, dv


@triton.jit
def _runs_readers_bad(Start, End, n_runs, QDom, qslot0, k_dom, READ: tl.constexpr,
                      REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Number of query tiles in the runs whose rows are not all of their first row's domain or
    (``READ``) whose domain the frozen relation forbids to read ``k_dom``. Reads every row's domain
    of every listed tile, ``CHUNK`` tiles at a time."""
    bad = 0
    m = tl.arange(0, BLOCK_M)
    for r in range(n_runs):
        t0 = tl.load(Start + r)
        t1 = tl.load(End + r)
        for c0 in range(t0, t1, CHUNK):
            ts = c0 + tl.arange(0, CHUNK)
            inside = ts < t1
            qd = tl.load(QDom + qslot0 + ts * BLOCK_M, mask=inside, other=0)
            rows = tl.load(QDom + qslot0 + ts[:, None] * BLOCK_M + m[None, :], mask=inside[:, None], other=0)
            bad += tl.sum((rows != qd[:, None]).to(tl.int32))
            if READ:
                ok = _domain_pair_allowed(qd, k_dom, REL, DP)
                bad += tl.sum(((ok == 0) & inside).to(tl.int32))
    return bad


@triton.jit
def _key_trust_kernel(
    Trust, QDom, KDom, FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tk, RF, RP, Hm,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_FULL: tl.constexpr,
):
    """``_key_trust`` as a launch of its own: program (key tile, batch * Hm + mask head)."""
    _key_trust(tl.program_id(0), tl.program_id(1), Trust, QDom, KDom, FullRuns, FullStart, FullEnd, PartRuns, PartStart,
               PartEnd, Sq, Sk, Tk, RF, RP, Hm, REL, DP, BLOCK_M, BLOCK_N, CHECK_FULL)


@triton.jit
def _bwd_checks_kernel(
    KTrust, QTrust, QDom, KDom, KIdx,
    FullRunsT, FullStartT, FullEndT, PartRunsT, PartStartT, PartEndT,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tk, Tq, RFT, RPT, RF, RP, Hm, Merged,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KT: tl.constexpr,
    CHECK_FULL: tl.constexpr, MERGE: tl.constexpr,
):
    """Both table checks of a backward in one launch (one launch less of host time): programs
    [0, Tk) check the key-major tables for dk/dv (``_key_trust``), programs [Tk, Tk + Tq) the
    query-major tables for dq (``forward._query_trust``, with ``MERGE`` also the merged runs the Gluon
    dq kernel walks); axis 1 is batch * Hm + mask head."""
    pid = tl.program_id(0)
    bm = tl.program_id(1)
    if pid < Tk:
        _key_trust(pid, bm, KTrust, QDom, KDom, FullRunsT, FullStartT, FullEndT, PartRunsT, PartStartT, PartEndT,
                   Sq, Sk, Tk, RFT, RPT, Hm, REL, DP, BLOCK_M, BLOCK_KT, CHECK_FULL)
    else:
        _query_trust(pid - Tk, bm, QTrust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd, PartRuns, PartStart,
                     PartEnd, Sq, Sk, Tq, RF, RP, Hm, REL, DP, BLOCK_M, BLOCK_N, CHECK_FULL, MERGE)


@triton.jit
def _key_trust(
    u, bm, Trust, QDom, KDom, FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tk, RF, RP, Hm,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_FULL: tl.constexpr,
):
    """What the dk/dv kernel launched right after it may trust in each key tile's key-major run
    tables, one program per (batch, mask head, key tile): Trust [B * Hm * Tk, 2] int32, both 0/1.
    FULL: with ``CHECK_FULL``, every listed query tile is domain-pure and its domain may read the
    key tile's (its first slot's) domain — the kernel adds that its own block of keys is all of
    that domain. PARTIAL: with ``CHECK_FULL``, every listed query tile is domain-pure (readability
    is masked per key on that path); unchecked tables: never. Runs not trusted run masked, with
    rows of another domain replaced by zeros. One program's share: key tile ``u`` of ``bm`` =
    batch * Hm + mask head."""
    b = bm // Hm
    qslot0 = b * Sq
    k_tile_dom = tl.load(KDom + b * Sk + u * BLOCK_N)
    lrow = (bm * Tk + u).to(tl.int64)
    FS, FE, n_full = FullStart + lrow * RF, FullEnd + lrow * RF, tl.load(FullRuns + lrow)
    PS, PE, n_part = PartStart + lrow * RP, PartEnd + lrow * RP, tl.load(PartRuns + lrow)
    # Runs reaching outside the row's query tiles (``forward._runs_outside``) are never trusted.
    inside = (_runs_outside(FS, FE, tl.minimum(n_full, RF), Sq // BLOCK_M) == 0) & (n_full <= RF)
    if CHECK_FULL:
        inside = inside & (_runs_outside(PS, PE, tl.minimum(n_part, RP), Sq // BLOCK_M) == 0) & (n_part <= RP)
        full_ok = inside & (_runs_readers_bad(FS, FE, n_full, QDom, qslot0, k_tile_dom, True, REL, DP, BLOCK_M, 16) == 0)
        part_ok = inside & (_runs_readers_bad(PS, PE, n_part, QDom, qslot0, k_tile_dom, False, REL, DP, BLOCK_M, 16) == 0)
        tl.store(Trust + lrow * 2, full_ok.to(tl.int32))
        tl.store(Trust + lrow * 2 + 1, part_ok.to(tl.int32))
    else:
        tl.store(Trust + lrow * 2, inside.to(tl.int32))
        tl.store(Trust + lrow * 2 + 1, 0)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0, col0, row_ok, q_idx,
             q_rank, tile_dom, qk_scale, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr,
             HAS_PAT: tl.constexpr, HEAD_DIM: tl.constexpr, SUB_N: tl.constexpr, MASKED: tl.constexpr,
             SELECT_K: tl.constexpr, PREC: tl.constexpr, BY_INDEX: tl.constexpr, USE_TMA: tl.constexpr):
    """Add the contribution of key slots [col0, col0 + SUB_N) to dq [SUB_M, D]. ``MASKED``: pairs
    allowed by ``tile_dom``'s relation, causality and pattern only; ``SELECT_K``: K rows of keys
    ``tile_dom`` may not read are replaced by zeros before dS @ K; ``BY_INDEX``: readability is the
    index test alone (see ``forward._masked_step``). ``USE_TMA``: K/V rows through the tensor
    descriptors ``Kd`` / ``Vd``, from row ``kv_row0 + col0`` of the [B*Hkv*Sk, D] views."""
    if USE_TMA:
        k = Kd.load([kv_row0 + col0, 0])
        v = Vd.load([kv_row0 + col0, 0])
    else:
        d = tl.arange(0, HEAD_DIM)
        cols = col0 + tl.arange(0, SUB_N)
        k = tl.load(Kp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
        v = tl.load(Vp + kv_off + cols[:, None] * HEAD_DIM + d[None, :])
    if MASKED:
        # BY_INDEX: slots checked (``forward._query_trust``), keys of a readable domain or padding (index < 0)
        readable, k_idx, k_rank = _key_attrs(KDom, KIdx, KRank, kslot0 + col0, tile_dom, REL, DP, SUB_N, HAS_PAT,
                                             BY_INDEX)
        if SELECT_K:
            k = tl.where(readable[:, None], k, 0.0)
        allowed = _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT, False)
        s = tl.where(allowed, _dot(q, tl.trans(k), None, PREC), float("-inf"))
        p = tl.where(allowed, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
    else:
        p = tl.math.exp2(_dot(q, tl.trans(k), None, PREC) * qk_scale - lse2[:, None])
    dp = _dot(do, tl.trans(v), None, PREC)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(allowed, ds, 0.0)
    return _dot(ds.to(k.dtype), k, dq, PREC)


@triton.jit
def _dq_run(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0, u0, u1, row_ok, q_idx,
            q_rank, tile_dom, qk_scale, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr,
            HAS_PAT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
            MASKED: tl.constexpr, SELECT_K: tl.constexpr, PREC: tl.constexpr, BY_INDEX: tl.constexpr,
            USE_TMA: tl.constexpr):
    """Key tiles [u0, u1) of one run, SUB_N slots at a time (one flat loop, as tuned); see ``_dq_step``."""
    for col0 in range(u0 * BLOCK_N, u1 * BLOCK_N, SUB_N):
        dq = _dq_step(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0, col0, row_ok,
                      q_idx, q_rank, tile_dom, qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, SUB_N, MASKED,
                      SELECT_K, PREC, BY_INDEX, USE_TMA)
    return dq


@triton.jit
def _dq_kernel(
    Qp, DOp, Lse2, Delta, Kp, Vp, Kd, Vd, DQ,
    sdqb, sdqh, sdqn,
    QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd, Order, Trust,
    Hq, Hkv, Sq, Sk, Tq, RF, RP, Hm, HG,
    qk_scale, sm_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
    PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    tl.static_assert(BLOCK_M % SUB_M == 0, "SUB_M must divide BLOCK_M")
    tl.static_assert(BLOCK_N % SUB_N == 0, "SUB_N must divide BLOCK_N")
    # Query blocks of the query tiles in Order (heaviest first), heads in groups of HG (``_schedule``).
    b = tl.program_id(1)
    rank, h = _schedule(tl.program_id(0), Sq // SUB_M, HG)
    hk = h // GROUP
    hm = h % Hm
    t = tl.load(Order + b * Tq + rank // (BLOCK_M // SUB_M))
    pid_m = t * (BLOCK_M // SUB_M) + rank % (BLOCK_M // SUB_M)
    rows = pid_m * SUB_M + tl.arange(0, SUB_M)
    d = tl.arange(0, HEAD_DIM)
    q_off = (b * Hq + h).to(tl.int64) * Sq
    q = tl.load(Qp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    do = tl.load(DOp + (q_off + rows[:, None]) * HEAD_DIM + d[None, :])
    lse2 = tl.load(Lse2 + q_off + rows)
    delta = tl.load(Delta + q_off + rows)
    q_dom = tl.load(QDom + b * Sq + rows)
    q_idx = tl.load(QIdx + b * Sq + rows)
    if HAS_PAT:
        q_rank = tl.load(QRank + b * Sq + rows)
    else:
        q_rank = q_idx
    # Query tiles are domain-pure (plan.sort_slots, check_plan); rows of another domain (a plan
    # altered after its check) make this sub-tile run masked, and they read nothing.
    tile_dom = tl.load(QDom + b * Sq + t * BLOCK_M)
    row_ok = q_dom == tile_dom
    kv_row0 = (b * Hkv + hk) * Sk  # first row of this (batch, kv head) in the [B*Hkv*Sk, D] views
    kv_off = kv_row0.to(tl.int64) * HEAD_DIM
    kslot0 = b * Sk
    dq = tl.zeros([SUB_M, HEAD_DIM], dtype=tl.float32)
    lrow = ((b * Hm + hm) * Tq + t).to(tl.int64)
    FS = FullStart + lrow * RF
    FE = FullEnd + lrow * RF
    PS = PartStart + lrow * RP
    PE = PartEnd + lrow * RP
    n_full = tl.load(FullRuns + lrow)
    n_part = tl.load(PartRuns + lrow)
    # As in the forward: the run tables are followed only for a pure tile whose listed key
    # domains the frozen relation lets it read (``forward._query_trust``, run just before).
    n_fast = tl.load(Trust + lrow * 2)
    n_part_fast = tl.load(Trust + lrow * 2 + 1)
    for r in range(n_fast):
        dq = _dq_run(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0,
                     tl.load(FS + r), tl.load(FE + r), row_ok, q_idx, q_rank, tile_dom, qk_scale, REL, CAUSAL, DP,
                     PAT, HAS_PAT, HEAD_DIM, BLOCK_N, SUB_N, False, False, PREC, False, USE_TMA)
    for r in range(n_part_fast):
        dq = _dq_run(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0,
                     tl.load(PS + r), tl.load(PE + r), row_ok, q_idx, q_rank, tile_dom, qk_scale, REL, CAUSAL, DP,
                     PAT, HAS_PAT, HEAD_DIM, BLOCK_N, SUB_N, True, False, PREC, True, USE_TMA)
    n_slow_full = n_full - n_fast
    for r in range(n_slow_full + n_part - n_part_fast):
        u0, u1 = _masked_run(r, n_slow_full, FS, FE, PS, PE, Sk // BLOCK_N)
        dq = _dq_run(dq, q, do, lse2, delta, Kp, Vp, Kd, Vd, kv_off, kv_row0, KDom, KIdx, KRank, kslot0, u0, u1, row_ok,
                     q_idx, q_rank, tile_dom, qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_N, SUB_N,
                     True, True, PREC, False, USE_TMA)
    q_tok = tl.load(QTok + b * Sq + rows)
    ok = q_tok >= 0
    row = tl.where(ok, q_tok, 0).to(tl.int64)
    base = b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + row[:, None] * sdqn + d[None, :]
    tl.store(DQ + base, (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])


def launch_key_trust(qs, ks, runs_t, tables, *, block_m, block_kt, check_full):
    """Launch ``_key_trust_kernel`` on a plan's key-major run tables: int32 [B * Hm * Tk, 2]."""
    full_t, part_t = runs_t
    b, hm, tk = full_t.num.shape
    trust = torch.empty(b * hm * tk, 2, dtype=torch.int32, device=full_t.num.device)
    _key_trust_kernel[(tk, b * hm)](
        trust, qs.dom, ks.dom, full_t.num, full_t.start, full_t.end, part_t.num, part_t.start, part_t.end,
        qs.size, ks.size, tk, full_t.start.shape[-1], part_t.start.shape[-1], hm,
        REL=tables.rel_bits, DP=tables.dp, BLOCK_M=block_m, BLOCK_N=block_kt, CHECK_FULL=check_full,
        num_warps=4, num_stages=1,
    )
    return trust


def launch_backward_checks(qs, ks, runs, runs_t, tables, *, block_m, block_n, block_kt, check_full, merge=False):
    """Launch ``_bwd_checks_kernel``: (key trust [B * Hm * Tk, 2], query trust [B * Hm * Tq, 2]),
    int32, what ``launch_key_trust`` and ``forward.launch_query_trust`` return, from one launch;
    ``merge`` adds a third item, the merged query-major runs (``forward.launch_query_trust``'s)."""
    full_t, part_t = runs_t
    full, part = runs
    b, hm, tk = full_t.num.shape
    tq = full.num.shape[2]
    dev = full_t.num.device
    key_trust = torch.empty(b * hm * tk, 2, dtype=torch.int32, device=dev)
    q_trust = torch.empty(b * hm * tq, 2, dtype=torch.int32, device=dev)
    rf, rp = full.start.shape[-1], part.start.shape[-1]
    merged = torch.empty(b * hm * tq, 1 + 3 * (rf + rp), dtype=torch.int32, device=dev) if merge else q_trust
    _bwd_checks_kernel[(tk + tq, b * hm)](
        key_trust, q_trust, qs.dom, ks.dom, ks.idx,
        full_t.num, full_t.start, full_t.end, part_t.num, part_t.start, part_t.end,
        full.num, full.start, full.end, part.num, part.start, part.end,
        qs.size, ks.size, tk, tq, full_t.start.shape[-1], part_t.start.shape[-1], full.start.shape[-1],
        part.start.shape[-1], hm, merged,
        REL=tables.rel_bits, DP=tables.dp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KT=block_kt, CHECK_FULL=check_full,
        MERGE=merge, num_warps=4, num_stages=1,
    )
    return (key_trust, q_trust, merged) if merge else (key_trust, q_trust)


def launch_backward(
    qp, dop, lse2, delta, kp, vp, dq, dk, dv, qs, ks, runs, runs_t, order, order_t, tables, scale,
    *, block_m, block_n, dkdv_cfg, dq_cfg, check_full=True, block_kt=None, dq_tma=False, concurrent=False,
    head_group=0, dq_gluon=False,
):
    """Fill dq [B, Hq, Nq, D], dk/dv [B, Hkv, Nk, D] (caller's order) from slot-order inputs.

    ``runs`` / ``runs_t``: (full, partial) ``plan.Runs``, query-major over (block_m, block_n)
    tiles / key-major over (block_kt, block_m) tiles (``block_kt`` keys, default ``block_n``:
    ``plan.merge_key_tiles``).
    dkdv_cfg / dq_cfg: dicts with SUB_N, SUB_M, num_warps, num_stages; dkdv_cfg may name FULL_M, the query
    rows per step of the unmasked (trusted FULL) runs (default SUB_M), and FULL_STAGES, that loop's pipeline
    stages (default num_stages).
    ``dq_tma``: the dq kernel reads K/V rows through tensor descriptors (on an H100 4-9% faster than
    pointer loads in bf16; the dk/dv kernel reading Q/dO that way was 23-32% slower, so it does not).
    ``concurrent``: the dq kernel runs on a side stream beside dk/dv (the two read the same inputs
    and write different outputs), after both table checks (one launch on the caller's stream); the
    caller's stream waits for it.
    ``order`` / ``order_t``: query / key tiles (of ``runs`` / ``runs_t``) in launch order
    (``plan.launch_order``); ``head_group``: heads per group of each launch (0: by the L2 cache).
    ``dq_gluon``: on an sm_90 GPU, dq by the warp-specialised Gluon kernel (``dq_sm90``) where it
    takes the shape (16-bit, head dim 64 or 128, 128-query dq programs over 128 x 64 tiles); it always
    loads K/V by TMA, whatever ``dq_tma`` says (that is the Triton dq's). dq_cfg's GLUON_STAGES sets its
    ring of K/V slots (2 or 3; default 3: with 2, H100 dq was 25% slower, BENCHMARKS.md).
    """
    b, hq, sq, d = qp.shape
    hkv, sk = kp.shape[1], kp.shape[2]
    full_t, part_t = runs_t
    hm, tk = full_t.num.shape[1], full_t.num.shape[2]
    common = dict(REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp, PAT=tables.pattern_constants,
                  HAS_PAT=tables.has_pattern, GROUP=hq // hkv,
                  HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, PREC=dot_precision(qp))
    side = None
    if concurrent and qp.is_cuda:
        main, side = torch.cuda.current_stream(qp.device), _side_stream(qp.device)
    c = dict(dkdv_cfg)
    grid = (sk // c["SUB_N"] * hkv, b)
    # A KV head's programs share the Q and dO rows of its GQA group's query heads.
    hg = pick_head_group(hkv, 2 * sq * d * qp.element_size() * (hq // hkv), qp.device, head_group)
    common_kt = dict(common, BLOCK_N=block_kt or block_n)
    cq = dict(dq_cfg)
    gluon = dq_gluon and cq["SUB_M"] == block_m and _sm90(qp, block_m=block_m, block_n=block_n, use_tma=True)
    checks = launch_backward_checks(qs, ks, runs, runs_t, tables, block_m=block_m, block_n=block_n,
                                    block_kt=block_kt or block_n, check_full=check_full, merge=gluon)
    key_trust, q_trust = checks[:2]
    if side is not None:
        side.wait_stream(main)  # dq reads the checks' results
    _dkdv_kernel[grid](
        qp, dop, lse2, delta, kp, vp, dk, dv,
        dk.stride(0), dk.stride(1), dk.stride(2),
        qs.dom, qs.idx, qs.rank, ks.tok, ks.dom, ks.idx, ks.rank,
        full_t.num, full_t.start, full_t.end, part_t.num, part_t.start, part_t.end, order_t, key_trust,
        hq, hkv, sq, sk, tk, full_t.start.shape[-1], part_t.start.shape[-1], hm, hg,
        scale * LOG2E, scale,
        SUB_N=c["SUB_N"], SUB_M=c["SUB_M"], FULL_M=c.get("FULL_M", c["SUB_M"]),
        FULL_STAGES=c.get("FULL_STAGES", c["num_stages"]), num_warps=c["num_warps"],
        num_stages=c["num_stages"], **common_kt,
    )
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if gluon:
            from .dq_sm90 import launch_dq_sm90

            launch_dq_sm90(qp, dop, lse2, delta, kp, vp, dq, qs, ks, runs, order, q_trust, checks[2], tables,
                           scale * LOG2E, scale, stages=cq.get("GLUON_STAGES", 3),
                           head_group=_group_for_kv(hq, hkv, sk, d, kp, head_group))
        else:
            _launch_dq(qp, dop, lse2, delta, kp, vp, dq, qs, ks, runs, order, q_trust, common, cq, scale, dq_tma,
                       head_group)
    if side is not None:
        main.wait_stream(side)


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    """One side stream per device, made once (creating streams per call would leak them)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def _launch_dq(qp, dop, lse2, delta, kp, vp, dq, qs, ks, runs, order, trust, common, c, scale, dq_tma, head_group):
    """The dq half of ``launch_backward`` (``_dq_kernel``, on the tables ``trust`` was computed from
    just before), on the current stream."""
    b, hq, sq, d = qp.shape
    hkv, sk = kp.shape[1], kp.shape[2]
    full, part = runs
    hm, tq = full.num.shape[1], full.num.shape[2]
    grid = (sq // c["SUB_M"] * hq, b)
    hg = _group_for_kv(hq, hkv, sk, d, kp, head_group)
    if dq_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd, vd = (TensorDescriptor.from_tensor(x.view(-1, d), [c["SUB_N"], d]) for x in (kp, vp))
    else:
        kd = vd = kp  # unused
    _dq_kernel[grid](
        qp, dop, lse2, delta, kp, vp, kd, vd, dq,
        dq.stride(0), dq.stride(1), dq.stride(2),
        qs.tok, qs.dom, qs.idx, qs.rank, ks.dom, ks.idx, ks.rank,
        full.num, full.start, full.end, part.num, part.start, part.end, order, trust,
        hq, hkv, sq, sk, tq, full.start.shape[-1], part.start.shape[-1], hm, hg,
        scale * LOG2E, scale,
        SUB_M=c["SUB_M"], SUB_N=c["SUB_N"], num_warps=c["num_warps"], num_stages=c["num_stages"], USE_TMA=dq_tma,
        **common,
    )
