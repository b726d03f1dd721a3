"""Forward guarded attention (flash-style online softmax over non-EMPTY tiles only).

Works in slot order (``plan.py``): ``launch_forward`` copies K/V into slot order
(``[B, Hkv, Sk, D]`` contiguous, zero rows at padding slots; gathering them inside the
kernel instead was measured 1.5x slower on an H100, and Hopper's tensor copies cannot
gather rows); Q is gathered and O scattered in the kernel, so the caller's tensors keep
their order. For each query tile the kernel walks its FULL key tiles (no element mask:
every pair allowed) and its PARTIAL key tiles (relation, causal and pattern mask from the
frozen constants), a FULL run and the PARTIAL run that starts where it ends as one pipelined
loop (merged by ``_query_trust`` from the runs it has checked). EMPTY tiles are never touched.

What is checked on the GPU, whatever the plan says: a query tile whose rows are not all of
its first row's domain runs every tile masked, and rows of another domain read nothing; before
the tables are trusted, the query-side check ``_query_trust`` (launched by ``launch_forward``
itself right before the forward, on the same tables, in the launch that copies K/V into slot
order, ``_kv_checks_kernel``; one program per batch, mask head and query tile, so heads
sharing a mask check once) reads the key domain of every FULL and PARTIAL tile listed (a FULL
tile's first slot, as check_plan has found key tiles domain-pure) and every slot of every
PARTIAL tile listed, and if any tile is of a domain the frozen relation does not let the query
tile read, or a PARTIAL tile holds a slot that is neither of its tile's domain nor padding
(sequence index < 0), every tile of that query tile takes the masked path with V rows of
unreadable keys replaced by zeros before the product (a select, never a multiplication by 0,
so ``0 * NaN`` cannot reach a protected row). K needs no such select: an unreadable key's
score is replaced by ``-inf`` before it is used, and each score depends on its key alone.
PARTIAL tiles that pass the check hold readable keys and padding only, so they mask padding
by its index and load no key domains.

Masked scores are ``-inf``; a row with no allowed key yields 0 and log-sum-exp 0. A readable
key that causality or a pattern excludes for some rows is masked on scores only, so a NaN/Inf
in its V can still reach rows of its tile as in dense attention (the certificate's threat
model lists this as not covered).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .masks import _key_readable, _tile_mask, pair_mask_reference
from .permute import _gather_rows, gather_block_rows

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _schedule(pid, T, HG):
    """Program ``pid`` of a launch over T ranks x H heads -> (rank in the launch order, head).

    Heads go in groups of HG (a divisor of H); inside a group the ranks vary slowest and the HG
    heads fastest. So every head's heavy tiles (the first ranks) start early, instead of the last
    head's starting when the GPU is nearly done, while the programs running together read the K/V
    of at most HG heads (``pick_head_group`` picks HG so those fit in L2)."""
    per = T * HG
    r = pid % per
    return r // HG, (pid // per) * HG + r % HG


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) in float32. PREC 0: tensor-core default; 1: IEEE fp32; 2: operands upcast
    to fp32 first (only for the CPU interpreter, whose bf16 dot is wrong)."""
    if PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_step(acc, l_i, m_i, q, k, v, allowed, qk_scale, PREC: tl.constexpr):
    """One key tile of the online softmax, pairs not ``allowed`` masked; scores in log2 units.
    Returns (acc, l, m)."""
    s = tl.where(allowed, _dot(q, k, None, PREC), float("-inf"))
    return _softmax_step(acc, l_i, m_i, s, v, qk_scale, PREC)


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, qk_scale, PREC: tl.constexpr):
    """The online softmax over one tile's raw scores ``s`` (masked pairs ``-inf``). Returns (acc, l, m)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row with nothing allowed yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, PREC)
    return acc, l_i, m_new


@triton.jit
def _load_kv(K, V, Kd, Vd, row0, d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """K and V rows [row0, row0 + BLOCK_N) of the slot-order [rows, D] views: two [BLOCK_N, D] tiles."""
    if USE_TMA:
        k = Kd.load([row0, 0])
        v = Vd.load([row0, 0])
    else:
        rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        k = tl.load(K + rows[:, None] * HEAD_DIM + d[None, :])
        v = tl.load(V + rows[:, None] * HEAD_DIM + d[None, :])
    return k, v


@triton.jit
def _key_attrs(KDom, KIdx, KRank, slot0, tile_dom, REL: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_PAT: tl.constexpr, BY_INDEX: tl.constexpr):
    """(readable, index, rank) of key slots [slot0, slot0 + BLOCK_N) for a query tile of domain
    ``tile_dom``: readability from the frozen relation and each key's domain, or with ``BY_INDEX``
    (slots checked to be of a readable domain or padding) from the index alone, no domain loaded.
    The rank is loaded only with a pattern."""
    cols = slot0 + tl.arange(0, BLOCK_N)
    k_idx = tl.load(KIdx + cols)
    if BY_INDEX:
        readable = k_idx >= 0
    else:
        readable = _key_readable(tile_dom, tl.load(KDom + cols), REL, DP)
    if HAS_PAT:
        k_rank = tl.load(KRank + cols)
    else:
        k_rank = k_idx
    return readable, k_idx, k_rank


@triton.jit
def _masked_step(acc, l_i, m_i, q, k, v, row_ok, q_idx, q_rank, tile_dom, KDom, KIdx, KRank, slot0, qk_scale,
                 REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREC: tl.constexpr, SELECT_V: tl.constexpr, BY_INDEX: tl.constexpr):
    """A PARTIAL key tile (or any tile, when the tables were not trusted): pairs allowed by the
    relation of the query tile's domain ``tile_dom`` (rows of another domain: none; see
    ``row_ok``), its causality and its pattern, from the frozen constants (``masks._tile_mask``).
    ``SELECT_V``: V rows of keys ``tile_dom`` may not read are replaced by zeros first.
    ``BY_INDEX``: the tile was checked to hold only keys of a domain ``tile_dom`` may read and
    padding slots (index < 0), so readability is the index test alone (``_key_attrs``)."""
    readable, k_idx, k_rank = _key_attrs(KDom, KIdx, KRank, slot0, tile_dom, REL, DP, BLOCK_N, HAS_PAT, BY_INDEX)
    if SELECT_V:
        v = tl.where(readable[:, None], v, 0.0)
    allowed = _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT, False)
    return _online_step(acc, l_i, m_i, q, tl.trans(k), v, allowed, qk_scale, PREC)


@triton.jit
def _runs_readable(Start, End, n_runs, KDom, kslot0, tile_dom,
                   REL: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Number of tiles in the runs whose key domain (a tile's first slot's) the frozen relation
    forbids to ``tile_dom``."""
    bad = 0
    for r in range(n_runs):
        kt0 = tl.load(Start + r)
        kt1 = tl.load(End + r)
        for c0 in range(kt0, kt1, CHUNK):
            kts = c0 + tl.arange(0, CHUNK)
            inside = kts < kt1
            kd = tl.load(KDom + kslot0 + kts * BLOCK_N, mask=inside, other=0)
            ok = _key_readable(tile_dom, kd, REL, DP) | (kts >= kt1)
            bad += tl.sum((ok == 0).to(tl.int32))
    return bad


@triton.jit
def _runs_impure(Start, End, n_runs, KDom, KIdx, kslot0, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Number of key slots in the runs' tiles that are neither of their tile's first slot's domain
    nor padding (sequence index < 0). Reads every slot, ``CHUNK`` tiles at a time."""
    bad = 0
    j = tl.arange(0, BLOCK_N)
    for r in range(n_runs):
        kt0 = tl.load(Start + r)
        kt1 = tl.load(End + r)
        for c0 in range(kt0, kt1, CHUNK):
            kts = c0 + tl.arange(0, CHUNK)
            inside = kts < kt1
            slots = kslot0 + kts[:, None] * BLOCK_N + j[None, :]
            kd = tl.load(KDom + slots, mask=inside[:, None], other=0)
            ki = tl.load(KIdx + slots, mask=inside[:, None], other=-1)
            first = tl.load(KDom + kslot0 + kts * BLOCK_N, mask=inside, other=0)
            bad += tl.sum(((kd != first[:, None]) & (ki >= 0)).to(tl.int32))
    return bad


@triton.jit
def _masked_run(r, n_slow_full, FS, FE, PS, PE, hi):
    """Bounds of run ``r`` of the masked pass: the ``n_slow_full`` FULL runs not taken as FULL, then
    every PARTIAL run; empty if it reaches outside tiles [0, ``hi``) (a table altered after its check
    may list such tiles, which hold no token of this row and head: reading them would read another's)."""
    in_full = r < n_slow_full
    t0 = tl.load(tl.where(in_full, FS + r, PS + (r - n_slow_full)))
    t1 = tl.load(tl.where(in_full, FE + r, PE + (r - n_slow_full)))
    return t0, tl.where((t0 >= 0) & (t1 <= hi), t1, t0)


@triton.jit
def _runs_outside(Start, End, n_runs, hi):
    """Number of the runs that are not empty and reach outside tiles [0, ``hi``). A check reads the
    labels of batch row b at tile t and a kernel the K/V rows of (b, head) at tile t, so past the
    row's tiles the two would be another row's labels and another head's keys."""
    bad = 0
    for r in range(n_runs):
        t0 = tl.load(Start + r)
        t1 = tl.load(End + r)
        bad += ((t0 < t1) & ((t0 < 0) | (t1 > hi))).to(tl.int32)
    return bad


@triton.jit
def _merge_runs(M, RM, FS, FE, n_full, PS, PE, n_part):
    """Write the runs a forward program walks in one loop each: every FULL run, with the PARTIAL run
    that starts where it ends (a domain's causal diagonal, a column tail) appended, then every other
    PARTIAL run. M[0] = count; M[1 + r], M[1 + RM + r], M[1 + 2 * RM + r] = first tile, first
    PARTIAL tile, end of run r. Every tile of the tables lands in exactly one run, with its kind."""
    n = 0
    for r in range(n_full):
        f1 = tl.load(FE + r)
        e = f1
        for p in range(n_part):
            e = tl.where(tl.load(PS + p) == f1, tl.load(PE + p), e)
        tl.store(M + 1 + n, tl.load(FS + r))
        tl.store(M + 1 + RM + n, f1)
        tl.store(M + 1 + 2 * RM + n, e)
        n += 1
    for p in range(n_part):
        p0 = tl.load(PS + p)
        hit = 0
        for r in range(n_full):
            hit += (tl.load(FE + r) == p0).to(tl.int32)
        if hit == 0:
            tl.store(M + 1 + n, p0)
            tl.store(M + 1 + RM + n, p0)
            tl.store(M + 1 + 2 * RM + n, tl.load(PE + p))
            n += 1
    tl.store(M, n)


@triton.jit
def _trust_kernel(
    Trust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tq, RF, RP, Hm,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_FULL: tl.constexpr,
    MERGE: tl.constexpr,
):
    """``_query_trust`` as a launch of its own: program (query tile, batch * Hm + mask head)."""
    _query_trust(tl.program_id(0), tl.program_id(1), Trust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd,
                 PartRuns, PartStart, PartEnd, Sq, Sk, Tq, RF, RP, Hm, REL, DP, BLOCK_M, BLOCK_N, CHECK_FULL, MERGE)


@triton.jit
def _query_trust(
    t, bm, Trust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tq, RF, RP, Hm,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_FULL: tl.constexpr,
    MERGE: tl.constexpr,
):
    """How many of its FULL and PARTIAL runs each query tile may take as its run tables say, for the
    forward and dq kernels launched right after it on the same tables: one program per (batch, mask
    head, query tile), so heads that share a mask check once. Trust [B * Hm * Tq, 2] int32.

    All of them when the tile's rows are all of its first row's domain, its run counts fit its table
    rows, its runs lie inside the row's key tiles, and — with ``CHECK_FULL`` — the frozen relation lets that domain read the key domain of
    every tile the runs list and every slot of a listed PARTIAL tile is of its tile's domain or
    padding (index < 0; such tiles are masked by index alone); otherwise none, and every tile runs
    masked with unreadable rows replaced. Unchecked tables: no PARTIAL run skips its select. With
    ``MERGE`` (the forward's launch) it also writes the runs the forward walks, made from the runs it
    trusts (``_merge_runs``; none for an untrusted tile). One program's share: query tile ``t`` of
    ``bm`` = batch * Hm + mask head."""
    b = bm // Hm
    tile_dom = tl.load(QDom + b * Sq + t * BLOCK_M)
    rows_dom = tl.load(QDom + b * Sq + t * BLOCK_M + tl.arange(0, BLOCK_M))
    trusted = tl.sum((rows_dom != tile_dom).to(tl.int32)) == 0
    lrow = (bm * Tq + t).to(tl.int64)
    n_full = tl.load(FullRuns + lrow)
    n_part = tl.load(PartRuns + lrow)
    # A count wider than its table's row would read (and merge) another tile's runs.
    trusted = trusted & (n_full <= RF) & (n_part <= RP)
    FS = FullStart + lrow * RF
    FE = FullEnd + lrow * RF
    PS = PartStart + lrow * RP
    PE = PartEnd + lrow * RP
    if trusted:  # (loads inside the table's row only)
        trusted = (_runs_outside(FS, FE, n_full, Sk // BLOCK_N) + _runs_outside(PS, PE, n_part, Sk // BLOCK_N)) == 0
    if CHECK_FULL:
        kslot0 = b * Sk
        bad = _runs_readable(FS, FE, n_full, KDom, kslot0, tile_dom, REL, DP, BLOCK_N, 64)
        bad += _runs_readable(PS, PE, n_part, KDom, kslot0, tile_dom, REL, DP, BLOCK_N, 64)
        # (one pass for both PARTIAL checks was 5-10% slower when the checks ran inside the forward kernel)
        bad += _runs_impure(PS, PE, n_part, KDom, KIdx, kslot0, BLOCK_N, 4)
        trusted = trusted & (bad == 0)
        n_part_fast = tl.where(trusted, n_part, 0)
    else:
        n_part_fast = 0
    n_fast = tl.where(trusted, n_full, 0)
    tl.store(Trust + lrow * 2 + 1, n_part_fast)
    tl.store(Trust + lrow * 2, n_fast)
    if MERGE:
        _merge_runs(Merged + lrow * (1 + 3 * (RF + RP)), RF + RP, FS, FE, n_fast, PS, PE, n_part_fast)


@triton.jit
def _kv_checks_kernel(
    K, V, Kp, Vp, KTok, skb, skh, skn, svb, svh, svn, Hkv, NK, R,
    Trust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd,
    Sq, Sk, Tq, RF, RP, Hm, BHm,
    REL: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_FULL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The forward's two preparations in one launch (one launch less of host time): programs
    [0, Tq * BHm) are ``_query_trust`` with merged runs (BHm = batch * Hm), the rest move K and V
    into slot order (``permute._gather_rows``, R programs per (batch, KV head))."""
    pid = tl.program_id(0)
    if pid < Tq * BHm:
        _query_trust(pid % Tq, pid // Tq, Trust, Merged, QDom, KDom, KIdx, FullRuns, FullStart, FullEnd, PartRuns,
                     PartStart, PartEnd, Sq, Sk, Tq, RF, RP, Hm, REL, DP, BLOCK_M, BLOCK_N, CHECK_FULL, True)
    else:
        g = pid - Tq * BHm
        _gather_rows(g // R, g % R, K, Kp, KTok, skb, skh, skn, Hkv, Sk, NK, V, Vp, svb, svh, svn, HEAD_DIM, BLOCK_R,
                     True)


def launch_kv_checks(k, v, qs, ks, runs, tables, *, block_m, block_n, check_full):
    """K and V [B, Hkv, N, D] in slot order (``permute.gather_rows(k, ks.tok, v)``) and the forward's
    table check with merged runs (``launch_query_trust(..., merge=True)``), from one launch:
    (kp, vp, trust, merged)."""
    full, part = runs
    b, hm, tq = full.num.shape
    rf, rp = full.start.shape[-1], part.start.shape[-1]
    hkv, n, d = k.shape[1], k.shape[2], k.shape[3]
    s = ks.size
    if k.stride(-1) != 1 or v.stride(-1) != 1 or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"launch_kv_checks: k {tuple(k.shape)} and v {tuple(v.shape)} must match, last dim contiguous")
    dev = full.num.device
    kp = torch.empty(b, hkv, s, d, dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    trust = torch.empty(b * hm * tq, 2, dtype=torch.int32, device=dev)
    merged = torch.empty(b * hm * tq, 1 + 3 * (rf + rp), dtype=torch.int32, device=dev)
    block_r = gather_block_rows(d)
    r = triton.cdiv(s, block_r)
    _kv_checks_kernel[(tq * b * hm + b * hkv * r,)](
        k, v, kp, vp, ks.tok, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), hkv, n, r,
        trust, merged, qs.dom, ks.dom, ks.idx, full.num, full.start, full.end, part.num, part.start, part.end,
        qs.size, s, tq, rf, rp, hm, b * hm,
        REL=tables.rel_bits, DP=tables.dp, BLOCK_M=block_m, BLOCK_N=block_n, CHECK_FULL=check_full,
        HEAD_DIM=d, BLOCK_R=block_r, num_warps=4, num_stages=1,
    )
    return kp, vp, trust, merged


def launch_query_trust(qs, ks, runs, tables, *, block_m, block_n, check_full, merge=False):
    """Launch ``_trust_kernel`` on a plan's query-major run tables: int32 [B * Hm * Tq, 2], and with
    ``merge`` also the merged runs, int32 [B * Hm * Tq, 1 + 3 * (RF + RP)] (else None)."""
    full, part = runs
    b, hm, tq = full.num.shape
    rf, rp = full.start.shape[-1], part.start.shape[-1]
    dev = full.num.device
    trust = torch.empty(b * hm * tq, 2, dtype=torch.int32, device=dev)
    merged = torch.empty(b * hm * tq, 1 + 3 * (rf + rp), dtype=torch.int32, device=dev) if merge else None
    _trust_kernel[(tq, b * hm)](
        trust, trust if merged is None else merged, qs.dom, ks.dom, ks.idx,
        full.num, full.start, full.end, part.num, part.start, part.end,
        qs.size, ks.size, tq, rf, rp, hm,
        REL=tables.rel_bits, DP=tables.dp, BLOCK_M=block_m, BLOCK_N=block_n, CHECK_FULL=check_full,
        MERGE=merge, num_warps=4, num_stages=1,
    )
    return (trust, merged) if merge else trust


@triton.jit
def _fwd_kernel(
    Q, K, V, Kd, Vd, O, Lse2,
    sqb, sqh, sqn,
    sob, soh, son,
    QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd, Order, Trust, Merged,
    Hq, Hkv, Sq, Sk, Tq, RF, RP, Hm, HG,
    qk_scale,
    REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr, PAT: tl.constexpr, HAS_PAT: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    tl.static_assert(BLOCK_M % 16 == 0, "BLOCK_M must be a multiple of 16")
    # Query tiles in Order (heaviest first), heads in groups of HG (``_schedule``).
    b = tl.program_id(1)
    rank, h = _schedule(tl.program_id(0), Tq, HG)
    hk = h // GROUP
    hm = h % Hm  # Hm is 1 (heads share the mask) or Hq
    t = tl.load(Order + b * Tq + rank)

    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_tok = tl.load(QTok + b * Sq + rows)
    q_dom = tl.load(QDom + b * Sq + rows)
    q_idx = tl.load(QIdx + b * Sq + rows)
    if HAS_PAT:
        q_rank = tl.load(QRank + b * Sq + rows)
    else:
        q_rank = q_idx
    q_ok = q_tok >= 0
    q_row = tl.where(q_ok, q_tok, 0).to(tl.int64)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + q_row[:, None] * sqn + d[None, :], mask=q_ok[:, None], other=0.0)
    # Query tiles are domain-pure (plan.sort_slots, check_plan), so one domain decides which
    # keys a tile may read; a tile that is not (a plan altered after its check) runs masked,
    # and its rows of another domain read nothing.
    tile_dom = tl.load(QDom + b * Sq + t * BLOCK_M)
    row_ok = q_dom == tile_dom

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    kv_row0 = (b * Hkv + hk) * Sk  # first row of this (batch, kv head) in the [B*Hkv*Sk, D] views
    kslot0 = b * Sk
    lrow = ((b * Hm + hm) * Tq + t).to(tl.int64)
    FS = FullStart + lrow * RF
    FE = FullEnd + lrow * RF
    PS = PartStart + lrow * RP
    PE = PartEnd + lrow * RP
    n_full = tl.load(FullRuns + lrow)
    n_part = tl.load(PartRuns + lrow)
    # Whatever the run tables say, they are followed only for a pure tile whose listed key
    # domains the frozen relation lets it read (``_query_trust``, run on these tables just
    # before); otherwise every tile runs masked, V selected.
    n_fast = tl.load(Trust + lrow * 2)
    n_part_fast = tl.load(Trust + lrow * 2 + 1)
    # The trusted runs merged by the trust kernel (``_merge_runs``): a FULL run and the PARTIAL
    # run right after it are one pipelined loop, PARTIAL tiles masked by key index.
    RM = RF + RP
    MB = Merged + lrow * (1 + 3 * RM)
    for r in range(tl.load(MB)):
        kt0 = tl.load(MB + 1 + r)
        ktm = tl.load(MB + 1 + RM + r)
        kt1 = tl.load(MB + 1 + 2 * RM + r)
        for kt in tl.range(kt0, kt1, warp_specialize=WARP_SPEC):
            k, v = _load_kv(K, V, Kd, Vd, kv_row0 + kt * BLOCK_N, d, BLOCK_N, HEAD_DIM, USE_TMA)
            s = _dot(q, tl.trans(k), None, PREC)
            if kt >= ktm:
                # PARTIAL, slots checked: every key readable or padding (zero V, index < 0).
                readable, k_idx, k_rank = _key_attrs(KDom, KIdx, KRank, kslot0 + kt * BLOCK_N, tile_dom, REL,
                                                     DP, BLOCK_N, HAS_PAT, True)
                allowed = _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP,
                                     PAT, HAS_PAT, False)
                s = tl.where(allowed, s, float("-inf"))
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, qk_scale, PREC)
    # Untrusted: the FULL runs not taken above, then the PARTIAL runs, all masked, V selected.
    n_slow_full = n_full - n_fast
    for r in range(n_slow_full + n_part - n_part_fast):
        kt0, kt1 = _masked_run(r, n_slow_full, FS, FE, PS, PE, Sk // BLOCK_N)
        for kt in range(kt0, kt1):
            k, v = _load_kv(K, V, Kd, Vd, kv_row0 + kt * BLOCK_N, d, BLOCK_N, HEAD_DIM, USE_TMA)
            acc, l_i, m_i = _masked_step(acc, l_i, m_i, q, k, v, row_ok, q_idx, q_rank, tile_dom, KDom, KIdx, KRank,
                                         kslot0 + kt * BLOCK_N, qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, BLOCK_N,
                                         PREC, True, False)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse2 = tl.where(empty, 0.0, m_i + tl.math.log2(l_safe))
    tl.store(Lse2 + (b * Hq + h).to(tl.int64) * Sq + rows, lse2)
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + q_row[:, None] * son + d[None, :], out.to(O.dtype.element_ty), mask=q_ok[:, None])


def dot_precision(q: torch.Tensor) -> int:
    """The ``PREC`` constant for ``_dot``: IEEE for fp32, and fp32 operands under the CPU
    interpreter (``TRITON_INTERPRET=1``); a compile for a GPU target gets what a GPU gets."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1":
        return 2
    return 1 if q.dtype == torch.float32 else 0


_L2_DEFAULT = 50 * 2**20  # an H100's L2; what the interpreter and stand-in targets assume


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or _L2_DEFAULT
    return _L2_DEFAULT


@functools.lru_cache(maxsize=256)
def pick_head_group(heads: int, bytes_per_head: int, device: torch.device, want: int = 0) -> int:
    """Heads per group of a launch (``_schedule``): ``want`` if positive, otherwise as many as keep
    what a group's programs share (``bytes_per_head`` each: K/V for the forward and dq, Q/dO for
    dk/dv) within half the GPU's L2 cache; rounded down to a divisor of ``heads``."""
    target = want if want > 0 else (_l2_bytes(device) // 2) // max(1, bytes_per_head)
    return max(g for g in range(1, heads + 1) if heads % g == 0 and g <= max(1, target))


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _sm90(q, *, block_m, block_n, use_tma) -> bool:
    """Whether the Gluon forward (``forward_sm90``) takes this call: an sm_90 target (the GPU, or the
    stand-in driver of ``tests/sm90_compile.py``), never the interpreter, and a shape it supports."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128):
        return False
    if block_m != 128 or block_n != 64 or not use_tma:
        return False
    if q.is_cuda:
        return _capability(q.device) == (9, 0)
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no GPU driver: nothing to compile for
        return False
    return target.backend == "cuda" and target.arch == 90


def _group_for_kv(hq: int, hkv: int, sk: int, d: int, kv: torch.Tensor, want: int) -> int:
    """``head_group`` for programs over query heads that read K/V rows [sk, d] of their KV head
    (the forward, dq): a query head's share is its KV head's K and V over the heads of a GQA group."""
    return pick_head_group(hq, 2 * sk * d * kv.element_size() // (hq // hkv), kv.device, want)


def launch_forward(
    q, k, v, qs, ks, runs, order, tables, scale, *, block_m, block_n, num_warps, num_stages,
    check_full=True, use_tma=False, warp_specialize=False, out=None, keep_kv=False, gluon=True, head_group=0,
):
    """Run ``_fwd_kernel`` on the caller's q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (last dims contiguous).

    ``runs`` = (full, partial) ``plan.Runs``. K and V are copied into slot order in the launch that
    checks the tables (``launch_kv_checks``); ``keep_kv``: those copies [B, Hkv, Sk, D] are returned
    too, as a third item (kp, vp), for a caller that keeps them (the backward reads them).
    ``gluon``: on an sm_90 GPU, run the warp-specialised Gluon kernel (``forward_sm90``) where it
    supports the call, with that many 64-key tiles per step (1 or 2; 0 or False: never); same
    tables, same results contract.
    ``order``: the query tiles in launch order (``plan.launch_order``); ``head_group``: heads per
    group of the launch (0: ``pick_head_group`` picks by the L2 cache).
    Returns (out [B, Hq, Nq, D] in q's order, lse2 [B, Hq, Sq] in log2 units, slot order).
    """
    b, hq, nq, d = q.shape
    hkv, sk = k.shape[1], ks.size
    full, part = runs
    hm, tq = full.num.shape[1], full.num.shape[2]
    if out is None:
        out = torch.empty_like(q)
    lse2 = torch.empty(b, hq, qs.size, dtype=torch.float32, device=q.device)
    k_slots, v_slots, trust, merged = launch_kv_checks(k, v, qs, ks, runs, tables, block_m=block_m, block_n=block_n,
                                                       check_full=check_full)
    kp, vp = k_slots.view(b * hkv * sk, d), v_slots.view(b * hkv * sk, d)
    done = (out, lse2, (k_slots, v_slots)) if keep_kv else (out, lse2)
    hg = _group_for_kv(hq, hkv, sk, d, kp, head_group)
    if gluon and _sm90(q, block_m=block_m, block_n=block_n, use_tma=use_tma):
        from .forward_sm90 import launch_forward_sm90

        launch_forward_sm90(q, kp, vp, out, lse2, qs, ks, runs, order, trust, merged, tables, scale * LOG2E,
                            per=int(gluon), head_group=hg)
        return done
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(kp, [block_n, d])
        vd = TensorDescriptor.from_tensor(vp, [block_n, d])
    else:
        kd = vd = kp  # unused
    grid = (tq * hq, b)
    _fwd_kernel[grid](
        q, kp, vp, kd, vd, out, lse2,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qs.tok, qs.dom, qs.idx, qs.rank, ks.dom, ks.idx, ks.rank,
        full.num, full.start, full.end, part.num, part.start, part.end, order, trust, merged,
        hq, hkv, qs.size, sk, tq, full.start.shape[-1], part.start.shape[-1], hm, hg,
        scale * LOG2E,
        REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp,
        PAT=tables.pattern_constants, HAS_PAT=tables.has_pattern,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=dot_precision(q), USE_TMA=use_tma, WARP_SPEC=warp_specialize,
        num_warps=num_warps, num_stages=num_stages,
    )
    return done


def forward_reference(q, k, v, qs, ks, tables, scale):
    """PyTorch twin of ``launch_forward`` (same inputs, dense slot-order mask from the frozen constants)."""
    from domainguard.attention import reference_from_mask

    from .permute import gather_rows_reference

    qp, kp, vp = (gather_rows_reference(x, s.tok) for x, s in ((q, qs), (k, ks), (v, ks)))
    mask = pair_mask_reference(qs.dom, qs.idx, ks.dom, ks.idx, tables, qs.rank, ks.rank)
    out_p, lse = reference_from_mask(qp, kp, vp, mask[:, None], scale=scale)
    # Back to the caller's order: padding slots are dropped.
    out = torch.zeros_like(q)
    for bi in range(q.shape[0]):
        real = qs.tok[bi] >= 0
        out[bi][:, qs.tok[bi][real].long()] = out_p[bi][:, real]
    return out, lse / LN2
