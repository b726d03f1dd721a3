"""The dq kernel for Hopper (sm_90), warp-specialised, written in Gluon.

Same contract, inputs and output as ``backward._dq_kernel`` with 128-query programs (read its
docstring and ``forward_sm90``'s first); only how the trusted runs are walked differs. Each
128-query tile is one program of three parts, as in the Gluon forward:

* a loader warp issues TMA loads of the K and V tiles of the tile's trusted runs (the runs
  ``forward._query_trust`` merged from the runs it checked, and nothing else) into a ring of
  shared-memory slots guarded by "ready" and "free" mbarriers (``forward_sm90._loader``);
* two consumer warpgroups, 64 query rows each, walk the same tiles. A step issues ``Q Kᵀ`` and
  ``dO Vᵀ`` of its tile, then the previous tile's ``dS K``, and waits for the first two only, so
  that the previous product runs on the tensor cores while this tile's P and dS are computed.
  V's slot is freed once ``dO Vᵀ`` is done, K's once the step after has used it for ``dS K``.

A FULL tile gets no element mask. A trusted PARTIAL tile (its slots checked to be readable or
padding) is masked by key index, causality and pattern, and its dS is selected to zero outside
the mask (not multiplied: a later key's V may hold anything). Then, with no loader, each consumer
walks the query tile's untrusted runs (a plan changed after its check): every tile masked by the
frozen relation, K and V loaded by pointer, and K rows of keys the tile may not read replaced by
zeros before ``dS K``.

Used by ``backward.launch_backward`` on an sm_90 GPU for 16-bit inputs, head dim 64 or 128, the
default tile sizes and 128-query dq programs; everything else, and the CPU interpreter, runs the
Triton kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .forward import _masked_run, _schedule
from .forward_sm90 import (
    CONSUMER_REGS, LOADER_REGS, ROWS, _loader, _next_run, _ring, _smem_layout, _stage_untrusted, _sync_warps,
)
from .masks import _key_readable, _tile_mask


@gluon.jit
def _key_index(KIdx, KRank, cols, HAS_PAT: gl.constexpr):
    """(index, rank) of key slots ``cols`` (the rank is the index where no pattern needs it)."""
    k_idx = gl.load(KIdx + cols)
    if HAS_PAT:
        return k_idx, gl.load(KRank + cols)
    return k_idx, k_idx


@gluon.jit
def _scores(s, dp, lse2, delta, kt, ktm, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom, qk_scale,
            CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr, HAS_PAT: gl.constexpr,
            BLOCK_N: gl.constexpr, col_l: gl.constexpr):
    """dS of one trusted tile from its raw scores ``s`` and ``dp`` = dO Vᵀ. A FULL tile (``kt <
    ktm``) is left unmasked; a PARTIAL one gets P and dS set to zero where its index, causality
    and pattern exclude a pair."""
    p = gl.exp2(s * qk_scale - lse2[:, None])
    ds = p * (dp - delta[:, None])
    if kt >= ktm:
        k_idx, k_rank = _key_index(KIdx, KRank, kslot0 + kt * BLOCK_N + gl.arange(0, BLOCK_N, col_l), HAS_PAT)
        allowed = _tile_mask(k_idx >= 0, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT,
                             False)
        ds = gl.where(allowed, ds, 0.0)
    return ds


@gluon.jit
def _consumer(qp_base, dop_base, Lse2, Delta, lse_row0, slot_row0, dq_base, sdqn, q_smem, do_smem, k_smem, v_smem,
              kx_smem, vx_smem, k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
              FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, n_kt, tile_dom,
              qk_scale, sm_scale, REL: gl.constexpr, CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr,
              HAS_PAT: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              HALF: gl.constexpr):
    """One warpgroup: query rows [64 * HALF, 64 * HALF + 64) of the tile at ``slot_row0``, all its runs."""
    slot_row0 += HALF * ROWS
    lse_row0 += HALF * ROWS
    dtype: gl.constexpr = k_smem.dtype
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_l)
    col_s: gl.constexpr = gl.SliceLayout(0, s_l)
    row_o: gl.constexpr = gl.SliceLayout(1, o_l)
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])

    # Q and dO rows of this group (slot order, contiguous) into its shared-memory tiles.
    ld_rows = (lse_row0 + gl.arange(0, ROWS, gl.SliceLayout(1, ld_l))).to(gl.int64)
    d_ld = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ld_l))
    q_s = q_smem.index(HALF)
    do_s = do_smem.index(HALF)
    q_s.store(gl.load(qp_base + ld_rows[:, None] * HEAD_DIM + d_ld[None, :]))
    do_s.store(gl.load(dop_base + ld_rows[:, None] * HEAD_DIM + d_ld[None, :]))
    fence_async_shared()
    _sync_warps()

    rows_s = slot_row0 + gl.arange(0, ROWS, row_s)
    q_idx = gl.load(QIdx + rows_s)
    if HAS_PAT:
        q_rank = gl.load(QRank + rows_s)
    else:
        q_rank = q_idx
    row_ok = gl.load(QDom + rows_s) == tile_dom
    lse2 = gl.load(Lse2 + lse_row0 + gl.arange(0, ROWS, row_s))
    delta = gl.load(Delta + lse_row0 + gl.arange(0, ROWS, row_s))

    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_l)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_l)

    # The trusted runs, as one stream of steps in the loader's order.
    n_runs = gl.load(MB)
    n_total = 0
    for r in range(n_runs):
        n_total += gl.maximum(gl.load(MB + 1 + 2 * RM + r) - gl.load(MB + 1 + r), 0)
    if n_total > 0:
        r, kt, ktm, kt1 = _next_run(MB, RM, -1, n_runs)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_s, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(0), 0)
        dp = warpgroup_mma(do_s, v_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(0, deps=(s, dp))
        mbarrier.arrive(v_free.index(0), count=1)
        ds = _scores(s, dp, lse2, delta, kt, ktm, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom, qk_scale,
                     CAUSAL, DP, PAT, HAS_PAT, BLOCK_N, col_s)
        ds = gl.convert_layout(ds.to(dtype), a_l)
        for j in range(1, n_total):
            kt += 1
            if kt >= kt1:
                r, kt, ktm, kt1 = _next_run(MB, RM, r, n_runs)
            cur = j % STAGES
            prev = (j - 1) % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(k_ready.index(cur), ph)
            s = warpgroup_mma(q_s, k_smem.index(cur).permute((1, 0)), zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(cur), ph)
            dp = warpgroup_mma(do_s, v_smem.index(cur).permute((1, 0)), zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(ds, k_smem.index(prev), acc, is_async=True)
            s, dp = warpgroup_mma_wait(1, deps=(s, dp))  # this tile's products; the previous dS K still running
            mbarrier.arrive(v_free.index(cur), count=1)
            ds = _scores(s, dp, lse2, delta, kt, ktm, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom,
                         qk_scale, CAUSAL, DP, PAT, HAS_PAT, BLOCK_N, col_s)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(k_free.index(prev), count=1)
            ds = gl.convert_layout(ds.to(dtype), a_l)
        last = (n_total - 1) % STAGES
        acc = warpgroup_mma(ds, k_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(k_free.index(last), count=1)

    # Untrusted: the FULL runs not taken above, then the PARTIAL runs, all masked, K selected, one
    # tile at a time.
    kx = kx_smem.index(HALF)
    vx = vx_smem.index(HALF)
    n_slow_full = n_full - n_fast
    for r in range(n_slow_full + n_part - n_part_fast):
        kt0, kt1 = _masked_run(r, n_slow_full, FS, FE, PS, PE, n_kt)
        for kt in range(kt0, kt1):
            _stage_untrusted(K, V, KDom, kv_row0, kslot0, kt, tile_dom, kx, vx, d_ld, REL, DP, HEAD_DIM, BLOCK_N,
                             False, ld_l)
            s = warpgroup_mma(q_s, kx.permute((1, 0)), zero, use_acc=False)
            dp = warpgroup_mma(do_s, vx.permute((1, 0)), zero, use_acc=False)
            cols = kslot0 + kt * BLOCK_N + gl.arange(0, BLOCK_N, col_s)
            k_idx, k_rank = _key_index(KIdx, KRank, cols, HAS_PAT)
            readable = _key_readable(tile_dom, gl.load(KDom + cols), REL, DP)
            allowed = _tile_mask(readable, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT,
                                 False)
            p = gl.where(allowed, gl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            ds = gl.where(allowed, p * (dp - delta[:, None]), 0.0)
            acc = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_l), kx, acc)

    o_tok = gl.load(QTok + slot_row0 + gl.arange(0, ROWS, row_o))
    o_row = gl.where(o_tok >= 0, o_tok, 0).to(gl.int64)
    d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_l))
    gl.store(dq_base + o_row[:, None] * sdqn + d_o[None, :], (acc * sm_scale).to(dtype), mask=(o_tok >= 0)[:, None])


@gluon.jit
def _dq_sm90_kernel(
    Qp, DOp, Lse2, Delta, K, V, k_desc, v_desc, DQ,
    sdqb, sdqh, sdqn,
    QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd, Order, Trust, Merged,
    Hq, Hkv, Sq, Sk, Tq, RF, RP, Hm, HG,
    qk_scale, sm_scale,
    REL: gl.constexpr, CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr, HAS_PAT: gl.constexpr,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_NREG: gl.constexpr, LOADER_NREG: gl.constexpr,
):
    # Programs as in the Triton kernel: query tiles in Order (heaviest first), heads in groups of HG.
    b = gl.program_id(1)
    rank, h = _schedule(gl.program_id(0), Tq, HG)
    hk = h // GROUP
    hm = h % Hm
    t = gl.load(Order + b * Tq + rank)
    tile_dom = gl.load(QDom + b * Sq + t * (2 * ROWS))
    kv_row0 = (b * Hkv + hk) * Sk
    kslot0 = b * Sk
    lrow = ((b * Hm + hm) * Tq + t).to(gl.int64)
    n_full = gl.load(FullRuns + lrow)
    n_part = gl.load(PartRuns + lrow)
    n_fast = gl.load(Trust + lrow * 2)
    n_part_fast = gl.load(Trust + lrow * 2 + 1)
    RM = RF + RP
    MB = Merged + lrow * (1 + 3 * RM)
    slot_row0 = b * Sq + t * (2 * ROWS)
    lse_row0 = (b * Hq + h).to(gl.int64) * Sq + t * (2 * ROWS)
    dq_base = DQ + b.to(gl.int64) * sdqb + h.to(gl.int64) * sdqh

    dtype: gl.constexpr = k_desc.dtype
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_sl)
    do_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    kx_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
    vx_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_ready, v_ready, k_free, v_free = _ring(STAGES)
    FS = FullStart + lrow * RF
    FE = FullEnd + lrow * RF
    PS = PartStart + lrow * RP
    PE = PartEnd + lrow * RP
    gl.warp_specialize([
        # (the argument tuples are written out, as in forward_sm90)
        (_consumer, (
            Qp, DOp, Lse2, Delta, lse_row0, slot_row0, dq_base, sdqn, q_smem, do_smem, k_smem, v_smem,
            kx_smem, vx_smem, k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
            FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, Sk // BLOCK_N, tile_dom,
            qk_scale, sm_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_N, STAGES, 0)),
        (_consumer, (
            Qp, DOp, Lse2, Delta, lse_row0, slot_row0, dq_base, sdqn, q_smem, do_smem, k_smem, v_smem,
            kx_smem, vx_smem, k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
            FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, Sk // BLOCK_N, tile_dom,
            qk_scale, sm_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_N, STAGES, 1)),
        # (one tile per slot: the loader never loads the tile of zeros, so K's descriptor stands in for it)
        (_loader, (k_desc, v_desc, k_desc, k_smem, v_smem, k_ready, v_ready, k_free, v_free, MB, RM, kv_row0,
                   BLOCK_N, 1, STAGES)),
    ], [4, 1], [CONSUMER_NREG, LOADER_NREG])


def launch_dq_sm90(qp, dop, lse2, delta, kp, vp, dq, qs, ks, runs, order, trust, merged, tables, qk_scale, sm_scale,
                   *, stages=3, head_group=1):
    """Launch ``_dq_sm90_kernel``: dq [B, Hq, Nq, D] (caller's order) from slot-order inputs (qp/dop
    [B, Hq, Sq, D], kp/vp [B, Hkv, Sk, D], lse2/delta [B, Hq, Sq]); ``trust``/``merged`` from
    ``forward._query_trust`` with merged runs on ``runs``; ``stages``: K/V ring slots, 2 or 3 (a
    tile's K slot is held until the next tile's dS K is done, so one slot would wait on itself, and
    four do not fit in shared memory at head dim 128); ``head_group``: heads per group of the launch
    (a divisor of the query heads)."""
    if stages not in (2, 3):
        raise ValueError(f"the Gluon dq kernel takes 2 or 3 K/V ring slots, got {stages!r}")
    b, hq, sq, d = qp.shape
    hkv, sk = kp.shape[1], kp.shape[2]
    full, part = runs
    hm, tq = full.num.shape[1], full.num.shape[2]
    block_n = 64
    lay = _smem_layout(block_n, d, kp.dtype)
    k2, v2 = kp.view(-1, d), vp.view(-1, d)
    kd = TensorDescriptor.from_tensor(k2, [block_n, d], lay)
    vd = TensorDescriptor.from_tensor(v2, [block_n, d], lay)
    if hq % head_group:
        raise ValueError(f"head_group {head_group} does not divide {hq} heads")
    _dq_sm90_kernel[(tq * hq, b)](
        qp, dop, lse2, delta, k2, v2, kd, vd, dq,
        dq.stride(0), dq.stride(1), dq.stride(2),
        qs.tok, qs.dom, qs.idx, qs.rank, ks.dom, ks.idx, ks.rank,
        full.num, full.start, full.end, part.num, part.start, part.end, order, trust, merged,
        hq, hkv, sq, sk, tq, full.start.shape[-1], part.start.shape[-1], hm, head_group,
        qk_scale, sm_scale,
        REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp,
        PAT=tables.pattern_constants, HAS_PAT=tables.has_pattern,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_N=block_n, STAGES=stages,
        CONSUMER_NREG=CONSUMER_REGS, LOADER_NREG=LOADER_REGS,
        num_warps=4,
    )
