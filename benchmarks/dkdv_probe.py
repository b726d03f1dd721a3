"""How fast can the dk/dv loop run on Hopper with K and V held in registers?

The guarded dk/dv kernel (``kernels/backward.py``) multiplies ``K Qᵀ`` and ``V dOᵀ`` as
``wgmma m64n32k16`` with both operands in shared memory; per multiply-add that reads more shared
memory than an SM delivers at the tensor cores' rate. Triton 3.6 reloads an operand put in
registers from shared memory on every step, so this probe writes the loop in Gluon, where K and V
can stay in registers as the A operand of ``wgmma`` for the whole loop. Q and dO tiles arrive by
TMA in a ring of ``STAGES`` slots, issued ``STAGES - 1`` steps ahead.

The ``split_*`` variants give dV's and dK's accumulators a warpgroup each (9 warps per 64-key
program: one warpgroup computes S^T, P^T and dV, hands P^T to the other through shared memory,
and the other computes dP^T, dS^T and dK; a loader warp feeds both by TMA), so that each has the
registers for 64- or 128-query products with its K or V operand in registers.

A probe, not a product kernel: dense, non-causal, bf16, head dim 128, one 64-key block per
program (4 warps; 9 for ``split_*``), no masks. It times, in turns, the Gluon variants and the same unmasked loop
written with the product kernel's ``_dkdv_step`` (the Triton baseline), checks each against a
float32 reference, and prints TF/s of the four products.

    python benchmarks/dkdv_probe.py [--n 8192] [--json out.json]
    python benchmarks/dkdv_probe.py --compile-only   # sm_90a resources, no GPU (tests/sm90_compile.py's driver)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from domainguard.kernels.backward import _dkdv_step
from domainguard.kernels.forward_sm90 import _sync_warps, _tma_load  # Gluon names that differ between releases

KEYS = 64  # keys per program (one warpgroup's wgmma M)


@gluon.jit
def _issue(q_desc, do_desc, q_smem, do_smem, ready, row, slot):
    mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    _tma_load(q_desc, [row, 0], ready.index(slot), q_smem.index(slot))
    _tma_load(do_desc, [row, 0], ready.index(slot), do_smem.index(slot))


@gluon.jit
def _dkdv_gluon(q_desc, do_desc, K, V, Lse2, Delta, DK, DV, N, qk_scale, sm_scale,
                HEAD_DIM: gl.constexpr, SUB_M: gl.constexpr, STAGES: gl.constexpr,
                K_REG: gl.constexpr, V_REG: gl.constexpr):
    pid = gl.program_id(0)
    h = gl.program_id(1)
    row0 = h * N  # first row of this head in the [H * N, D] views
    dtype: gl.constexpr = q_desc.dtype
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUB_M, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    a_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2)
    a_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)

    keys = pid * 64 + gl.arange(0, 64, gl.SliceLayout(1, ld_l))
    d_ld = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ld_l))
    offs = (row0 + keys).to(gl.int64)[:, None] * HEAD_DIM + d_ld[None, :]
    k = gl.load(K + offs)
    v = gl.load(V + offs)
    if K_REG:
        k_op = gl.convert_layout(k, a_s)
    else:
        k_op = gl.allocate_shared_memory(dtype, [64, HEAD_DIM], kv_sl, k)
    if V_REG:
        v_op = gl.convert_layout(v, a_s)
    else:
        v_op = gl.allocate_shared_memory(dtype, [64, HEAD_DIM], kv_sl, v)

    q_smem = gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], do_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    n_steps = N // SUB_M
    for i in gl.static_range(STAGES - 1):
        _issue(q_desc, do_desc, q_smem, do_smem, ready, row0 + i * SUB_M, i)

    cols = gl.arange(0, SUB_M, gl.SliceLayout(0, s_l))
    zero = gl.zeros([64, SUB_M], gl.float32, s_l)
    # Accumulators carried through the loop as wgmma tokens: each step's dV/dK product runs on while the
    # next step's S^T and dP^T are issued.
    dk = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, o_l))
    dv = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, o_l))
    for j in range(n_steps):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        qs = q_smem.index(s)
        dos = do_smem.index(s)
        st = warpgroup_mma(k_op, qs.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_op, dos.permute((1, 0)), zero, use_acc=False, is_async=True)
        lse = gl.load(Lse2 + row0 + j * SUB_M + cols)
        delta = gl.load(Delta + row0 + j * SUB_M + cols)
        # Everything but dpt done: this step's S^T, and the last step's dV/dK (so its slot is free).
        st = warpgroup_mma_wait(1, deps=(st, ))
        nxt = j + STAGES - 1
        if nxt < n_steps:
            _issue(q_desc, do_desc, q_smem, do_smem, ready, row0 + nxt * SUB_M, nxt % STAGES)
        pt = gl.exp2(st * qk_scale - lse[None, :])
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_o), dos, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt, ))
        dst = pt * (dpt - delta[None, :])
        dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), a_o), qs, dk, is_async=True)
    dk = warpgroup_mma_wait(0, deps=(dk, ))
    dv = warpgroup_mma_wait(0, deps=(dv, ))
    keys_o = pid * 64 + gl.arange(0, 64, gl.SliceLayout(1, o_l))
    d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_l))
    out = (row0 + keys_o).to(gl.int64)[:, None] * HEAD_DIM + d_o[None, :]
    gl.store(DK + out, (dk * sm_scale).to(dtype))
    gl.store(DV + out, dv.to(dtype))


@gluon.jit
def _key_rows_operand(X, pid, row0, HEAD_DIM: gl.constexpr, SUB_M: gl.constexpr):
    """This program's 64 rows of K or V as the register (A) operand of a [64, SUB_M] wgmma."""
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUB_M, 16])
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    keys = pid * 64 + gl.arange(0, 64, gl.SliceLayout(1, ld_l))
    d_ld = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ld_l))
    x = gl.load(X + (row0 + keys).to(gl.int64)[:, None] * HEAD_DIM + d_ld[None, :])
    return gl.convert_layout(x, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))


@gluon.jit
def _store_key_rows(Out, acc, pid, row0, HEAD_DIM: gl.constexpr):
    """A [64, HEAD_DIM] accumulator to this program's 64 rows of ``Out``."""
    o_l: gl.constexpr = acc.type.layout
    keys_o = pid * 64 + gl.arange(0, 64, gl.SliceLayout(1, o_l))
    d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_l))
    gl.store(Out + (row0 + keys_o).to(gl.int64)[:, None] * HEAD_DIM + d_o[None, :], acc.to(Out.dtype.element_ty))


@gluon.jit
def _split_v_group(q_smem, do_smem, p_smem, ready, free, p_ready, p_free, K, Lse2, DV, pid, row0, n_steps, qk_scale,
                   HEAD_DIM: gl.constexpr, SUB_M: gl.constexpr, STAGES: gl.constexpr, P_STAGES: gl.constexpr):
    """Warpgroup 1 of a split program: S^T = K Q^T, P^T (handed to the other warpgroup through
    shared memory), dV += P^T dO. Holds only dV's accumulator."""
    dtype: gl.constexpr = q_smem.dtype
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUB_M, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    a_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    k_op = _key_rows_operand(K, pid, row0, HEAD_DIM, SUB_M)
    cols = gl.arange(0, SUB_M, gl.SliceLayout(0, s_l))
    zero = gl.zeros([64, SUB_M], gl.float32, s_l)
    dv = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, o_l))
    for j in range(n_steps):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        st = warpgroup_mma(k_op, q_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        lse = gl.load(Lse2 + row0 + j * SUB_M + cols)
        st = warpgroup_mma_wait(0, deps=(st, ))  # this step's S^T, and (all groups) the last step's dV product
        if j > 0:
            mbarrier.arrive(free.index((j - 1) % STAGES), count=1)
        pt = gl.exp2(st * qk_scale - lse[None, :]).to(dtype)
        sp = j % P_STAGES
        mbarrier.wait(p_free.index(sp), ((j // P_STAGES) & 1) ^ 1)
        p_smem.index(sp).store(pt)
        _sync_warps()
        mbarrier.arrive(p_ready.index(sp), count=1)
        dv = warpgroup_mma(gl.convert_layout(pt, a_o), do_smem.index(s), dv, is_async=True)
    dv = warpgroup_mma_wait(0, deps=(dv, ))
    _store_key_rows(DV, dv, pid, row0, HEAD_DIM)


@gluon.jit
def _split_k_group(q_smem, do_smem, p_smem, ready, free, p_ready, p_free, V, Delta, DK, pid, row0, n_steps, sm_scale,
                   HEAD_DIM: gl.constexpr, SUB_M: gl.constexpr, STAGES: gl.constexpr, P_STAGES: gl.constexpr):
    """Warpgroup 2: dP^T = V dO^T, dS^T = P^T (dP^T - Delta) with P^T from warpgroup 1, dK += dS^T Q.
    Holds only dK's accumulator."""
    dtype: gl.constexpr = q_smem.dtype
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUB_M, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    a_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    v_op = _key_rows_operand(V, pid, row0, HEAD_DIM, SUB_M)
    cols = gl.arange(0, SUB_M, gl.SliceLayout(0, s_l))
    zero = gl.zeros([64, SUB_M], gl.float32, s_l)
    dk = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, o_l))
    for j in range(n_steps):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        dpt = warpgroup_mma(v_op, do_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        delta = gl.load(Delta + row0 + j * SUB_M + cols)
        dpt = warpgroup_mma_wait(0, deps=(dpt, ))  # and the last step's dK product
        if j > 0:
            mbarrier.arrive(free.index((j - 1) % STAGES), count=1)
        sp = j % P_STAGES
        mbarrier.wait(p_ready.index(sp), (j // P_STAGES) & 1)
        pt = p_smem.index(sp).load(s_l)
        _sync_warps()
        mbarrier.arrive(p_free.index(sp), count=1)
        dst = (pt.to(gl.float32) * (dpt - delta[None, :])).to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dst, a_o), q_smem.index(s), dk, is_async=True)
    dk = warpgroup_mma_wait(0, deps=(dk, ))
    _store_key_rows(DK, dk * sm_scale, pid, row0, HEAD_DIM)


@gluon.jit
def _split_loader(q_desc, do_desc, q_smem, do_smem, ready, free, row0, n_steps,
                  SUB_M: gl.constexpr, STAGES: gl.constexpr):
    for j in range(n_steps):
        s = j % STAGES
        mbarrier.wait(free.index(s), ((j // STAGES) & 1) ^ 1)
        _issue(q_desc, do_desc, q_smem, do_smem, ready, row0 + j * SUB_M, s)


@gluon.jit
def _dkdv_split(q_desc, do_desc, K, V, Lse2, Delta, DK, DV, N, qk_scale, sm_scale,
                HEAD_DIM: gl.constexpr, SUB_M: gl.constexpr, STAGES: gl.constexpr, P_STAGES: gl.constexpr,
                GROUP_REGS: gl.constexpr):
    """64 keys per program, 9 warps: dV's and dK's accumulators in two warpgroups of their own (so
    each has the registers for m64n64 products and its K or V operand), a TMA loader warp."""
    pid = gl.program_id(0)
    h = gl.program_id(1)
    row0 = h * N
    dtype: gl.constexpr = q_desc.dtype
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, SUB_M], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, SUB_M, HEAD_DIM], do_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [P_STAGES, 64, SUB_M], p_sl)
    bar_l: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_l)
    p_ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_l)
    p_free = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], bar_l)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)  # one arrival per warpgroup
    for i in gl.static_range(P_STAGES):
        mbarrier.init(p_ready.index(i), count=1)
        mbarrier.init(p_free.index(i), count=1)
    n_steps = N // SUB_M
    gl.warp_specialize([
        (_split_v_group, (q_smem, do_smem, p_smem, ready, free, p_ready, p_free, K, Lse2, DV, pid, row0, n_steps,
                          qk_scale, HEAD_DIM, SUB_M, STAGES, P_STAGES)),
        (_split_k_group, (q_smem, do_smem, p_smem, ready, free, p_ready, p_free, V, Delta, DK, pid, row0, n_steps,
                          sm_scale, HEAD_DIM, SUB_M, STAGES, P_STAGES)),
        (_split_loader, (q_desc, do_desc, q_smem, do_smem, ready, free, row0, n_steps, SUB_M, STAGES)),
    ], [4, 1], [GROUP_REGS, 24])


@triton.jit
def _dkdv_triton(Q, DO, Lse2, Delta, K, V, DK, DV, N, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, SUB_N: tl.constexpr, SUB_M: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    cols = pid * SUB_N + tl.arange(0, SUB_N)
    d = tl.arange(0, HEAD_DIM)
    off = (h * N).to(tl.int64) * HEAD_DIM
    k = tl.load(K + off + cols[:, None] * HEAD_DIM + d[None, :])
    v = tl.load(V + off + cols[:, None] * HEAD_DIM + d[None, :])
    dk = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([SUB_N, HEAD_DIM], dtype=tl.float32)
    for row0 in range(0, N, SUB_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, Lse2, Delta, Q, Q, Q, h * N, 0, row0, None, None, None, None, None,
                            qk_scale, 0, 0, 0, 0, False, HEAD_DIM, SUB_M, False, False, 0)
    tl.store(DK + off + cols[:, None] * HEAD_DIM + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + off + cols[:, None] * HEAD_DIM + d[None, :], dv.to(DV.dtype.element_ty))


TRITON = {  # name: (query rows per step, pipeline stages); "triton" is the product kernel's config
    "triton": (32, 3),
    "triton_m64_s2": (64, 2),
    "triton_m64_s3": (64, 3),
}
VARIANTS = {  # name: (K in registers, V in registers, query rows per step, ring slots)
    "kv_reg_m16": (True, True, 16, 4),
    "kv_reg_m32": (True, True, 32, 3),
    "k_reg_m32": (True, False, 32, 3),
    "smem_m32": (False, False, 32, 3),
    "smem_m64": (False, False, 64, 2),
}
SPLIT = {  # name: (query rows per step, Q/dO ring slots, P^T slots, registers per warpgroup); K, V in registers
    "split_m64": (64, 3, 2, 240),
    "split_m64_s4": (64, 4, 2, 240),
    "split_m128": (128, 2, 2, 240),
}


def make_inputs(h: int, n: int, d: int, dev) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(h, n, d, generator=g).to(dev, torch.bfloat16) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = p @ v.float()
    delta = (o * do.float()).sum(-1)
    dp = do.float() @ v.float().transpose(-1, -2)
    ds = p * (dp - delta[..., None])
    ref_dv = p.transpose(-1, -2) @ do.float()
    ref_dk = ds.transpose(-1, -2) @ q.float() * scale
    return {"q": q, "k": k, "v": v, "do": do, "lse2": (lse / math.log(2)).contiguous(), "delta": delta.contiguous(),
            "scale": scale, "ref": (ref_dk, ref_dv)}


def launcher(name: str, x: dict):
    h, n, d = x["q"].shape
    dk, dv = torch.empty_like(x["k"]), torch.empty_like(x["v"])
    qk_scale = x["scale"] * 1.4426950408889634
    if name in TRITON:
        sub_m, stages = TRITON[name]

        def run():
            _dkdv_triton[(n // 64, h)](x["q"], x["do"], x["lse2"], x["delta"], x["k"], x["v"], dk, dv, n, qk_scale,
                                       x["scale"], HEAD_DIM=d, SUB_N=64, SUB_M=sub_m, num_warps=4, num_stages=stages)
            return dk, dv
        return run
    if name in SPLIT:
        sub_m, stages, p_stages, regs = SPLIT[name]
        lay = gl.NVMMASharedLayout.get_default_for([sub_m, d], gl.bfloat16)
        qd = TensorDescriptor.from_tensor(x["q"].view(-1, d), [sub_m, d], lay)
        dod = TensorDescriptor.from_tensor(x["do"].view(-1, d), [sub_m, d], lay)

        def run():
            _dkdv_split[(n // KEYS, h)](qd, dod, x["k"], x["v"], x["lse2"], x["delta"], dk, dv, n, qk_scale,
                                        x["scale"], HEAD_DIM=d, SUB_M=sub_m, STAGES=stages, P_STAGES=p_stages,
                                        GROUP_REGS=regs, num_warps=4)
            return dk, dv
        return run
    k_reg, v_reg, sub_m, stages = VARIANTS[name]
    lay = gl.NVMMASharedLayout.get_default_for([sub_m, d], gl.bfloat16)
    qd = TensorDescriptor.from_tensor(x["q"].view(-1, d), [sub_m, d], lay)
    dod = TensorDescriptor.from_tensor(x["do"].view(-1, d), [sub_m, d], lay)

    def run():
        _dkdv_gluon[(n // KEYS, h)](qd, dod, x["k"], x["v"], x["lse2"], x["delta"], dk, dv, n, qk_scale, x["scale"],
                                    HEAD_DIM=d, SUB_M=sub_m, STAGES=stages, K_REG=k_reg, V_REG=v_reg, num_warps=4)
        return dk, dv
    return run


def resources(fn) -> dict:
    out = {}
    for cache in getattr(fn, "device_caches", {}).values():
        for ck in cache[0].values():
            out[str(len(out))] = {"regs": ck.n_regs, "spills": ck.n_spills, "smem": ck.metadata.shared}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--variants", default=",".join([*TRITON, *VARIANTS, *SPLIT]))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    dev = torch.device("cuda")
    x = make_inputs(args.heads, args.n, 128, dev)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(sys.argv), "n": args.n, "heads": args.heads}
    runs, res = {}, {}
    for name in names:
        try:
            run = launcher(name, x)
            dk, dv = run()
            torch.cuda.synchronize()
            err = max(((dk.float() - x["ref"][0]).abs().max() / x["ref"][0].abs().max()).item(),
                      ((dv.float() - x["ref"][1]).abs().max() / x["ref"][1].abs().max()).item())
            res[name] = {"rel_err": err, "ok": err < 2e-2}
            runs[name] = run
        except Exception as e:  # a variant that fails to compile is reported, the rest go on
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["_triton_compiled"] = resources(_dkdv_triton)
    res["_gluon_compiled"] = resources(_dkdv_gluon)
    res["_split_compiled"] = resources(_dkdv_split)
    flops = 8.0 * args.n * args.n * 128 * args.heads
    times = {name: [] for name in runs}
    for rnd in range(args.rounds):
        order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
        for name in order:
            run = runs[name]
            for _ in range(5):
                run()
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
            for a, b in evs:
                a.record()
                run()
                b.record()
            torch.cuda.synchronize()
            times[name].append(statistics.median(a.elapsed_time(b) for a, b in evs))
    for name, t in times.items():
        ms = statistics.median(t)
        res[name].update({"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "rounds": [round(v, 4) for v in t]})
    print(json.dumps({"info": info, "results": res}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "results": res}, fh, indent=1)


def compile_only() -> None:
    """Compile every variant for sm_90a through ``tests/sm90_compile.py``'s stand-in driver (no GPU
    needed) and print registers and spill bytes from ptxas."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    import sm90_compile

    records, call = [], [None]
    sm90_compile._install(records, call)
    x = make_inputs(2, 256, 128, torch.device("cpu"))
    for name in [*TRITON, *VARIANTS, *SPLIT]:
        call[0] = name
        try:
            launcher(name, x)()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(json.dumps({"call": name, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}), flush=True)


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:
        main()
