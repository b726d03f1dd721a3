"""How fast can a warp-specialised attention loop run on Hopper when written in Gluon?

Triton 3.6's ``tl.range(warp_specialize=True)`` did not give the guarded forward a correct
specialisation (``ws_probe.py``), and a hand-ordered ``Q Kᵀ`` of the next tile ahead of this tile's
softmax was compiled to an immediate wait. Gluon (``triton.experimental.gluon``, shipped with
Triton 3.6) states both explicitly: a loader warp issues TMA loads into a ring of shared-memory
slots guarded by mbarriers, and two consumer warpgroups, each with 64 query rows of a 128-row
tile, issue ``wgmma`` asynchronously so that one tile's softmax runs while the tensor cores
multiply the previous tile's ``P V``.

This is a probe, not a product kernel: dense, non-causal, bf16, head dim 128, the shape
``ws_probe.py`` times (16 heads x 8192 x 128), so the two can be compared in one run.

    python benchmarks/gluon_probe.py [--n 8192] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

ROWS_PER_WG = 64  # query rows per consumer warpgroup
ROWS = gl.constexpr(ROWS_PER_WG)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
            q_row, kv_row, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + ROWS, 0], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_free.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_free.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, o_row, half, n_tiles,
              qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              OVERLAP: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.index(half)
    mbarrier.wait(q_bar, 0)
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([ROWS], gl.float32, row_l)

    # tile 0: scores only
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    mbarrier.arrive(k_free.index(0), count=1)
    m_i = gl.max(s, axis=1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)
    p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    for j in range(1, n_tiles):
        sl = j % STAGES
        ph = (j // STAGES) & 1
        pv = (j - 1) % STAGES
        pph = ((j - 1) // STAGES) & 1
        mbarrier.wait(k_ready.index(sl), ph)
        s = warpgroup_mma(q, k_smem.index(sl).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(pv), pph)
        acc = warpgroup_mma(p, v_smem.index(pv), acc, is_async=True)
        if OVERLAP:
            s = warpgroup_mma_wait(1, deps=(s, ))
        else:
            s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_free.index(sl), count=1)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_free.index(pv), count=1)
        acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
        p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_free.index(last), count=1)
    acc = acc / gl.convert_layout(l_i, orow_l)[:, None]
    rows = gl.arange(0, ROWS, orow_l)
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
    ptrs = O + (o_row + rows)[:, None].to(gl.int64) * HEAD_DIM + cols[None, :]
    gl.store(ptrs, acc.to(gl.bfloat16))


@gluon.jit
def _consumer1(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, o_row, n_tiles, qk_scale,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, o_row + ROWS, 1, n_tiles,
              qk_scale, HEAD_DIM, BLOCK_N, STAGES, OVERLAP)


@gluon.jit
def _consumer0(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, o_row, n_tiles, qk_scale,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, o_row, 0, n_tiles,
              qk_scale, HEAD_DIM, BLOCK_N, STAGES, OVERLAP)


@gluon.jit
def probe_kernel(q_desc, k_desc, v_desc, O, N, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, OVERLAP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 LOADER_REGS: gl.constexpr):
    t = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * N + t * (2 * ROWS)
    kv_row = bh * N
    n_tiles = N // BLOCK_N
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_l)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)
        mbarrier.init(v_free.index(i), count=2)
    gl.warp_specialize([
        (_consumer0, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, q_row, n_tiles,
                      qk_scale, HEAD_DIM, BLOCK_N, STAGES, OVERLAP)),
        (_consumer1, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free, O, q_row, n_tiles,
                      qk_scale, HEAD_DIM, BLOCK_N, STAGES, OVERLAP)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
                   q_row, kv_row, n_tiles, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def gluon_attention(q, k, v, *, block_n=128, stages=2, overlap=True, consumer_regs=232, loader_regs=40):
    """q, k, v: [B*H, N, D] bf16, contiguous. Dense, non-causal."""
    bh, n, d = q.shape
    assert n % 128 == 0 and n % block_n == 0
    o = torch.empty_like(q)
    q2, k2, v2 = (x.reshape(bh * n, d) for x in (q, k, v))
    lay_q = gl.NVMMASharedLayout.get_default_for([ROWS_PER_WG, d], gl.bfloat16)
    lay_kv = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.bfloat16)
    qd = TensorDescriptor.from_tensor(q2, [ROWS_PER_WG, d], lay_q)
    kd = TensorDescriptor.from_tensor(k2, [block_n, d], lay_kv)
    vd = TensorDescriptor.from_tensor(v2, [block_n, d], lay_kv)
    grid = (n // 128, bh)
    probe_kernel[grid](qd, kd, vd, o, n, 1.0 / math.sqrt(d) * 1.4426950408889634, HEAD_DIM=d, BLOCK_N=block_n,
                       STAGES=stages, OVERLAP=overlap, CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs,
                       num_warps=4)
    return o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (args.heads, args.n, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * args.heads * args.n * args.n * 128
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    rows = []
    ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None]))
    rows.append({"variant": "sdpa", "ms": ms, "tflops": flops / ms * 1e-9})
    print(rows[-1], flush=True)
    variants = [("gluon_ws_overlap_s2", dict(stages=2)), ("gluon_ws_nooverlap_s2", dict(stages=2, overlap=False)),
                ("gluon_ws_overlap_s3", dict(stages=3)),
                ("gluon_ws_overlap_s2_r240_24", dict(stages=2, consumer_regs=240, loader_regs=24)),
                ("gluon_ws_overlap_bn64_s2", dict(block_n=64, stages=2)),
                ("gluon_ws_overlap_bn64_s3", dict(block_n=64, stages=3)),
                ("gluon_ws_overlap_bn64_s4", dict(block_n=64, stages=4))]
    for name, kw in variants:
        row = {"variant": name}
        try:
            out = gluon_attention(q, k, v, **kw)
            torch.cuda.synchronize()
            row["max_err"] = (out.float() - ref.float()).abs().max().item()
            row["finite"] = bool(torch.isfinite(out).all())
            ms = triton.testing.do_bench(lambda: gluon_attention(q, k, v, **kw))
            row.update(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as e:  # a variant that does not compile is a result, not the end of the run
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "shape": list(shape), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
