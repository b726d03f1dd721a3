"""The guarded forward for Hopper (sm_90), warp-specialised, written in Gluon.

Same contract, inputs and outputs as ``forward._fwd_kernel`` (read its docstring first); only
how the trusted runs are walked differs. Each 128-query tile is one program of three parts:

* a loader warp issues TMA loads of the K and V tiles of the tile's trusted runs (the runs
  ``forward._query_trust`` merged from the runs it checked, and nothing else) into a ring of shared
  memory slots, each guarded by a "ready" and a "free" mbarrier;
* two consumer warpgroups, 64 query rows each, walk the same tiles: ``Q Kᵀ`` of a tile is issued
  before the previous tile's ``P V`` and waited for first, so the softmax of one tile runs while
  the tensor cores multiply the previous one (FlashAttention-3's in-warpgroup overlap).

A FULL tile gets no element mask. A trusted PARTIAL tile (its slots checked to be readable or
padding) is masked by key index, causality and pattern, as in the Triton kernel. Then, with no
loader, each consumer walks the query tile's untrusted runs (a plan changed after its check):
every tile masked by the frozen relation, with K and V loaded by pointer and V rows of keys
the tile may not read replaced by zeros (a select) before the product.

Used by ``forward.launch_forward`` on an sm_90 GPU for 16-bit inputs, head dim 64 or 128, the
default tile sizes; everything else, and the CPU interpreter, runs the Triton kernel.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .forward import _masked_run, _schedule
from .masks import _key_readable, _tile_mask

# Gluon is experimental and renames things between releases: a barrier across a partition's
# warps is ``thread_barrier`` in Triton 3.6 and ``barrier`` later; a TMA load into shared memory
# ``async_copy_global_to_shared`` in 3.6 and ``async_load`` later.
_sync_warps = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

ROWS_PER_GROUP = 64  # query rows per consumer warpgroup; a program holds two
ROWS = gl.constexpr(ROWS_PER_GROUP)
CONSUMER_REGS = 240
LOADER_REGS = 24


@gluon.jit
def _loader(k_desc, v_desc, z_desc, k_smem, v_smem, k_ready, v_ready, k_free, v_free, MB, RM, kv_row0,
            BLOCK_N: gl.constexpr, PER: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of every tile of the merged runs at ``MB``, in order, ``PER`` tiles to a ring slot
    (a run's odd last tile is followed by a tile of zeros from ``z_desc``)."""
    j = 0
    for r in range(gl.load(MB)):
        kt0 = gl.load(MB + 1 + r)
        kt1 = gl.load(MB + 1 + 2 * RM + r)
        for kt in range(kt0, kt1, PER):
            s = j % STAGES
            ph = (j // STAGES) & 1
            row = kv_row0 + kt * BLOCK_N
            mbarrier.wait(k_free.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), PER * k_desc.block_type.nbytes)
            _load_step(k_desc, z_desc, row, kt + 1 < kt1, k_ready.index(s), k_smem.index(s), BLOCK_N, PER)
            mbarrier.wait(v_free.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), PER * v_desc.block_type.nbytes)
            _load_step(v_desc, z_desc, row, kt + 1 < kt1, v_ready.index(s), v_smem.index(s), BLOCK_N, PER)
            j += 1


@gluon.jit
def _load_step(desc, z_desc, row, second, bar, dst, BLOCK_N: gl.constexpr, PER: gl.constexpr):
    """Rows [row, row + PER * BLOCK_N) into ``dst``; with PER 2 and no ``second`` tile, zeros instead."""
    if PER == 1:
        _tma_load(desc, [row, 0], bar, dst)
    else:
        _tma_load(desc, [row, 0], bar, dst.slice(0, BLOCK_N))
        if second:
            _tma_load(desc, [row + BLOCK_N, 0], bar, dst.slice(BLOCK_N, BLOCK_N))
        else:
            _tma_load(z_desc, [0, 0], bar, dst.slice(BLOCK_N, BLOCK_N))


@gluon.jit
def _ring(STAGES: gl.constexpr):
    """The mbarriers of a ring of ``STAGES`` K/V slots: (k_ready, v_ready, k_free, v_free); the loader
    arrives on "ready" (with the bytes it loads), each of the two consumer warpgroups on "free"."""
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(v_free.index(i), count=2)
    return k_ready, v_ready, k_free, v_free


@gluon.jit
def _stage_untrusted(K, V, KDom, kv_row0, kslot0, kt, tile_dom, kx, vx, d_ld, REL: gl.constexpr, DP: gl.constexpr,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SELECT_V: gl.constexpr, ld_l: gl.constexpr):
    """Tile ``kt``'s K and V rows, loaded by pointer, into one warpgroup's ``kx`` / ``vx`` for the
    untrusted path, the rows of keys ``tile_dom`` may not read replaced by zeros in V (``SELECT_V``,
    the forward: P V) or else in K (dq: dS K)."""
    kv_rows = (kv_row0 + kt * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, ld_l))).to(gl.int64)
    k = gl.load(K + kv_rows[:, None] * HEAD_DIM + d_ld[None, :])
    v = gl.load(V + kv_rows[:, None] * HEAD_DIM + d_ld[None, :])
    ld_cols = kslot0 + kt * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, ld_l))
    readable = _key_readable(tile_dom, gl.load(KDom + ld_cols), REL, DP)[:, None]
    if SELECT_V:
        v = gl.where(readable, v, 0.0)
    else:
        k = gl.where(readable, k, 0.0)
    _sync_warps()  # every warp is done with the previous tile's copies
    kx.store(k)
    vx.store(v)
    fence_async_shared()
    _sync_warps()


@gluon.jit
def _next_run(MB, RM, r, n_runs):
    """The first non-empty merged run after run ``r``: (run, first tile, first PARTIAL tile, end)."""
    r += 1
    kt = gl.load(MB + 1 + r, mask=r < n_runs, other=0)
    ktm = gl.load(MB + 1 + RM + r, mask=r < n_runs, other=0)
    kt1 = gl.load(MB + 1 + 2 * RM + r, mask=r < n_runs, other=0)
    while (kt >= kt1) & (r + 1 < n_runs):
        r += 1
        kt = gl.load(MB + 1 + r)
        ktm = gl.load(MB + 1 + RM + r)
        kt1 = gl.load(MB + 1 + 2 * RM + r)
    return r, kt, ktm, kt1


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale):
    """One tile of the online softmax on raw scores ``s`` (masked pairs ``-inf``): (p, alpha, l, m)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    # A row with nothing allowed yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + gl.sum(p, axis=1), m_new


@gluon.jit
def _step_mask(s, kt, ktm, kt1, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom,
               CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr, HAS_PAT: gl.constexpr,
               BLOCK_N: gl.constexpr, PER: gl.constexpr, col_l: gl.constexpr):
    """Scores of the step of ``PER`` tiles from ``kt``. A step of FULL tiles only is left alone; one
    holding a trusted PARTIAL tile (``>= ktm``: slots readable or padding) or a run's end (a tile of
    zeros after it) gets the pairs its index, causality and pattern exclude, and the keys past the
    run, set to ``-inf``."""
    if (kt + PER > ktm) | (kt + PER > kt1):
        c = gl.arange(0, PER * BLOCK_N, col_l)
        cols = kslot0 + kt * BLOCK_N + c
        inside = c < (kt1 - kt) * BLOCK_N
        k_idx = gl.load(KIdx + cols, mask=inside, other=-1)
        if HAS_PAT:
            k_rank = gl.load(KRank + cols, mask=inside, other=-1)
        else:
            k_rank = k_idx
        allowed = _tile_mask(k_idx >= 0, row_ok, q_idx, q_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT,
                             False)
        s = gl.where(allowed, s, float("-inf"))
    return s


@gluon.jit
def _consumer(q_base, sqn, o_base, son, Lse2, lse_row0, slot_row0, q_smem, k_smem, v_smem, kx_smem, vx_smem,
              k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
              FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, n_kt, tile_dom,
              qk_scale, REL: gl.constexpr, CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr, HAS_PAT: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PER: gl.constexpr, STAGES: gl.constexpr,
              HALF: gl.constexpr):
    """One warpgroup: query rows [64 * HALF, 64 * HALF + 64) of the tile at ``slot_row0``, all its runs."""
    slot_row0 += HALF * ROWS
    lse_row0 += HALF * ROWS
    dtype: gl.constexpr = k_smem.dtype
    STEP: gl.constexpr = PER * BLOCK_N  # keys per step of the trusted runs
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, STEP, 16])
    x_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_l)
    col_s: gl.constexpr = gl.SliceLayout(0, s_l)
    row_o: gl.constexpr = gl.SliceLayout(1, o_l)
    row_x: gl.constexpr = gl.SliceLayout(1, x_l)
    col_x: gl.constexpr = gl.SliceLayout(0, x_l)
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])

    # Q rows gathered by token (zeros at padding slots) into this group's shared-memory tile.
    ld_rows = gl.arange(0, ROWS, gl.SliceLayout(1, ld_l))
    d_ld = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ld_l))
    q_tok = gl.load(QTok + slot_row0 + ld_rows)
    q_row = gl.where(q_tok >= 0, q_tok, 0).to(gl.int64)
    q = gl.load(q_base + q_row[:, None] * sqn + d_ld[None, :], mask=(q_tok >= 0)[:, None], other=0.0)
    q_s = q_smem.index(HALF)
    q_s.store(q)
    fence_async_shared()
    _sync_warps()

    rows_s = slot_row0 + gl.arange(0, ROWS, row_s)
    q_idx = gl.load(QIdx + rows_s)
    if HAS_PAT:
        q_rank = gl.load(QRank + rows_s)
    else:
        q_rank = q_idx
    row_ok = gl.load(QDom + rows_s) == tile_dom

    zero = gl.zeros([ROWS, STEP], gl.float32, s_l)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_l)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)

    # The trusted runs, as one stream of steps in the loader's order (a run whose end is not past its
    # start is empty for both).
    n_runs = gl.load(MB)
    n_total = 0
    for r in range(n_runs):
        n_total += (gl.maximum(gl.load(MB + 1 + 2 * RM + r) - gl.load(MB + 1 + r), 0) + PER - 1) // PER
    if n_total > 0:
        r, kt, ktm, kt1 = _next_run(MB, RM, -1, n_runs)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_s, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_free.index(0), count=1)
        s = _step_mask(s, kt, ktm, kt1, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom, CAUSAL, DP, PAT,
                       HAS_PAT, BLOCK_N, PER, col_s)
        p, alpha, l_i, m_i = _softmax(s, m_i, l_i, qk_scale)
        p = gl.convert_layout(p.to(dtype), p_l)
        for j in range(1, n_total):
            kt += PER
            if kt >= kt1:
                r, kt, ktm, kt1 = _next_run(MB, RM, r, n_runs)
            cur = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(cur), (j // STAGES) & 1)
            s = warpgroup_mma(q_s, k_smem.index(cur).permute((1, 0)), zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # this tile's scores; the previous P V still running
            mbarrier.arrive(k_free.index(cur), count=1)
            s = _step_mask(s, kt, ktm, kt1, KIdx, KRank, kslot0, row_ok, q_idx, q_rank, tile_dom, CAUSAL, DP,
                           PAT, HAS_PAT, BLOCK_N, PER, col_s)
            p, alpha, l_i, m_i = _softmax(s, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(v_free.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p.to(dtype), p_l)
        last = (n_total - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_total - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_free.index(last), count=1)

    # Untrusted: the FULL runs not taken above, then the PARTIAL runs, all masked, V selected, one
    # tile at a time.
    m_i = gl.convert_layout(m_i, row_x)
    l_i = gl.convert_layout(l_i, row_x)
    kx = kx_smem.index(HALF)
    vx = vx_smem.index(HALF)
    n_slow_full = n_full - n_fast
    x_idx = gl.convert_layout(q_idx, row_x)
    x_rank = gl.convert_layout(q_rank, row_x)
    x_ok = gl.convert_layout(row_ok, row_x)
    zero_x = gl.zeros([ROWS, BLOCK_N], gl.float32, x_l)
    for r in range(n_slow_full + n_part - n_part_fast):
        kt0, kt1 = _masked_run(r, n_slow_full, FS, FE, PS, PE, n_kt)
        for kt in range(kt0, kt1):
            _stage_untrusted(K, V, KDom, kv_row0, kslot0, kt, tile_dom, kx, vx, d_ld, REL, DP, HEAD_DIM, BLOCK_N,
                             True, ld_l)
            s = warpgroup_mma(q_s, kx.permute((1, 0)), zero_x, use_acc=False)
            cols = kslot0 + kt * BLOCK_N + gl.arange(0, BLOCK_N, col_x)
            k_idx = gl.load(KIdx + cols)
            if HAS_PAT:
                k_rank = gl.load(KRank + cols)
            else:
                k_rank = k_idx
            readable = _key_readable(tile_dom, gl.load(KDom + cols), REL, DP)
            allowed = _tile_mask(readable, x_ok, x_idx, x_rank, k_idx, k_rank, tile_dom, CAUSAL, DP, PAT, HAS_PAT,
                                 False)
            s = gl.where(allowed, s, float("-inf"))
            p, alpha, l_i, m_i = _softmax(s, m_i, l_i, qk_scale)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), vx, acc)

    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    gl.store(Lse2 + lse_row0 + gl.arange(0, ROWS, row_x), gl.where(empty, 0.0, m_i + gl.log2(l_safe)))
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    out = gl.where(gl.convert_layout(empty, row_o)[:, None], 0.0, out)
    o_tok = gl.load(QTok + slot_row0 + gl.arange(0, ROWS, row_o))
    o_row = gl.where(o_tok >= 0, o_tok, 0).to(gl.int64)
    d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_l))
    gl.store(o_base + o_row[:, None] * son + d_o[None, :], out.to(dtype), mask=(o_tok >= 0)[:, None])


@gluon.jit
def _fwd_sm90_kernel(
    Q, K, V, k_desc, v_desc, z_desc, O, Lse2,
    sqb, sqh, sqn,
    sob, soh, son,
    QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
    FullRuns, FullStart, FullEnd, PartRuns, PartStart, PartEnd, Order, Trust, Merged,
    Hq, Hkv, Sq, Sk, Tq, RF, RP, Hm, HG,
    qk_scale,
    REL: gl.constexpr, CAUSAL: gl.constexpr, DP: gl.constexpr, PAT: gl.constexpr, HAS_PAT: gl.constexpr,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PER: gl.constexpr, STAGES: gl.constexpr,
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
    q_base = Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh
    o_base = O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
    slot_row0 = b * Sq + t * (2 * ROWS)
    lse_row0 = (b * Hq + h).to(gl.int64) * Sq + t * (2 * ROWS)

    dtype: gl.constexpr = k_desc.dtype
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, PER * BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, PER * BLOCK_N, HEAD_DIM], v_desc.layout)
    kx_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
    vx_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_ready, v_ready, k_free, v_free = _ring(STAGES)
    FS = FullStart + lrow * RF
    FE = FullEnd + lrow * RF
    PS = PartStart + lrow * RP
    PE = PartEnd + lrow * RP
    gl.warp_specialize([
        # (the argument tuples are written out: a tuple assigned to a name first would turn the
        # frozen tuple constants into tensors)
        (_consumer, (
            q_base, sqn, o_base, son, Lse2, lse_row0, slot_row0, q_smem, k_smem, v_smem, kx_smem, vx_smem,
            k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
            FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, Sk // BLOCK_N, tile_dom,
            qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_N, PER, STAGES, 0)),
        (_consumer, (
            q_base, sqn, o_base, son, Lse2, lse_row0, slot_row0, q_smem, k_smem, v_smem, kx_smem, vx_smem,
            k_ready, v_ready, k_free, v_free, K, V, QTok, QDom, QIdx, QRank, KDom, KIdx, KRank,
            FS, FE, PS, PE, MB, RM, n_full, n_part, n_fast, n_part_fast, kslot0, kv_row0, Sk // BLOCK_N, tile_dom,
            qk_scale, REL, CAUSAL, DP, PAT, HAS_PAT, HEAD_DIM, BLOCK_N, PER, STAGES, 1)),
        (_loader, (k_desc, v_desc, z_desc, k_smem, v_smem, k_ready, v_ready, k_free, v_free, MB, RM, kv_row0,
                   BLOCK_N, PER, STAGES)),
    ], [4, 1], [CONSUMER_NREG, LOADER_NREG])


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [rows, head_dim] tile of ``dtype`` (made once per shape and dtype)."""
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], _GL_DTYPE[dtype])


@functools.lru_cache(maxsize=None)
def _zero_tile(device: torch.device, dtype: torch.dtype, head_dim: int, rows: int) -> TensorDescriptor:
    """The tensor descriptor of a [rows, head_dim] tile of zeros (what a run's odd last tile is paired
    with); made once per device, dtype and shape and kept (the descriptor keeps its tensor alive)."""
    zeros = torch.zeros(rows, head_dim, dtype=dtype, device=device)
    return TensorDescriptor.from_tensor(zeros, [rows, head_dim], _smem_layout(rows, head_dim, dtype))


def launch_forward_sm90(q, kp, vp, out, lse2, qs, ks, runs, order, trust, merged, tables, qk_scale, *, per=2,
                        stages=2, head_group=1):
    """Launch ``_fwd_sm90_kernel``; kp/vp are K/V in slot order as [B * Hkv * Sk, D] views. ``per``:
    64-key tiles per step of the trusted runs (2: 128-key steps); ``head_group``: heads per group of
    the launch (a divisor of the query heads)."""
    if per not in (1, 2):
        raise ValueError(f"per must be 1 or 2 tiles per step, got {per!r}")
    b, hq, _, d = q.shape
    hkv = kp.shape[0] // (b * ks.size)
    full, part = runs
    hm, tq = full.num.shape[1], full.num.shape[2]
    block_n = 64
    lay = _smem_layout(block_n, d, kp.dtype)
    kd = TensorDescriptor.from_tensor(kp, [block_n, d], lay)
    vd = TensorDescriptor.from_tensor(vp, [block_n, d], lay)
    zd = _zero_tile(kp.device, kp.dtype, d, block_n)
    if hq % head_group:
        raise ValueError(f"head_group {head_group} does not divide {hq} heads")
    _fwd_sm90_kernel[(tq * hq, b)](
        q, kp, vp, kd, vd, zd, out, lse2,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qs.tok, qs.dom, qs.idx, qs.rank, ks.dom, ks.idx, ks.rank,
        full.num, full.start, full.end, part.num, part.start, part.end, order, trust, merged,
        hq, hkv, qs.size, ks.size, tq, full.start.shape[-1], part.start.shape[-1], hm, head_group,
        qk_scale,
        REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp,
        PAT=tables.pattern_constants, HAS_PAT=tables.has_pattern,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_N=block_n, PER=per, STAGES=stages,
        CONSUMER_NREG=CONSUMER_REGS, LOADER_NREG=LOADER_REGS,
        num_warps=4,
    )
