"""Does Triton's ``warp_specialize`` (or two programs per SM) speed up a plain attention loop here?

A dense, non-causal flash-attention forward (16 heads x 8192 x 128, bf16) written several ways
(K/V through host or device tensor descriptors, Q by pointer or descriptor, one loop or runs,
``tl.range(warp_specialize=True)``, register caps, masked tiles under a branch or a select), each
variant compiled and timed in a process of its own (a compiler crash ends only that variant), one
JSON line per variant. Not a product kernel: BENCHMARKS.md ("Tried, not kept") says what it showed.

    python benchmarks/ws_probe.py -1 out.jsonl        # SDPA, dense, same shape
    for i in $(seq 0 29); do python benchmarks/ws_probe.py $i out.jsonl; done
"""
import json, sys, time
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

def alloc_fn(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")
triton.set_allocator(alloc_fn)


@triton.jit
def _step(acc, l_i, m_i, q, k, v, qk_scale):
    s = tl.dot(q, k.T)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def fa_kernel(Q, K, V, Kd, Vd, O, N, NRUNS, qk_scale, RS, RE, LST, KIDX,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DEV_DESC: tl.constexpr, WS: tl.constexpr, MODE: tl.constexpr, Q_DESC: tl.constexpr = False):
    # MODE 0: one flat loop; 1: NRUNS runs, WS on the outer loop; 2: NRUNS runs, WS on each inner loop
    t = tl.program_id(0)
    bh = tl.program_id(1)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * N * HEAD_DIM
    if Q_DESC:
        qd = tl.make_tensor_descriptor(Q, shape=[N * 16, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
        q = qd.load([bh * N + t * BLOCK_M, 0])
    else:
        q = tl.load(Q + base + rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :])
    if DEV_DESC:
        kd = tl.make_tensor_descriptor(K, shape=[N * 16, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
        vd = tl.make_tensor_descriptor(V, shape=[N * 16, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        kd = Kd
        vd = Vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row0 = bh * N
    nt = N // BLOCK_N
    if MODE == 0:
        for kt in tl.range(0, nt, warp_specialize=WS):
            k = kd.load([row0 + kt * BLOCK_N, 0])
            v = vd.load([row0 + kt * BLOCK_N, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale)
    elif MODE == 1:
        per = nt // NRUNS
        for r in tl.range(0, NRUNS, warp_specialize=WS):
            for kt in range(r * per, r * per + per):
                k = kd.load([row0 + kt * BLOCK_N, 0])
                v = vd.load([row0 + kt * BLOCK_N, 0])
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale)
    elif MODE == 3:
        # runs from tables, walked with loop-carried state (producer only)
        r = 0
        kt = tl.load(RS)
        ke = tl.load(RE)
        for i in tl.range(0, nt, warp_specialize=WS):
            k = kd.load([row0 + kt * BLOCK_N, 0])
            v = vd.load([row0 + kt * BLOCK_N, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale)
            kt += 1
            nxt = kt == ke
            r += nxt.to(tl.int32)
            rr = tl.minimum(r, NRUNS - 1)
            kt = tl.where(nxt, tl.load(RS + rr), kt)
            ke = tl.where(nxt, tl.load(RE + rr), ke)
    elif MODE == 4:
        # a list of tiles
        for i in tl.range(0, nt, warp_specialize=WS):
            kt = tl.load(LST + i)
            k = kd.load([row0 + kt * BLOCK_N, 0])
            v = vd.load([row0 + kt * BLOCK_N, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale)
    elif MODE == 5:
        # the last 4 tiles masked by key index under a branch
        for kt in tl.range(0, nt, warp_specialize=WS):
            k = kd.load([row0 + kt * BLOCK_N, 0])
            v = vd.load([row0 + kt * BLOCK_N, 0])
            s = tl.dot(q, k.T)
            if kt >= nt - 4:
                kidx = tl.load(KIDX + kt * BLOCK_N + tl.arange(0, BLOCK_N))
                s = tl.where(rows[:, None] + N - 4 * BLOCK_N - 128 >= kidx[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    elif MODE == 6:
        # every tile masked by key index (a select)
        for kt in tl.range(0, nt, warp_specialize=WS):
            k = kd.load([row0 + kt * BLOCK_N, 0])
            v = vd.load([row0 + kt * BLOCK_N, 0])
            s = tl.dot(q, k.T)
            kidx = tl.load(KIDX + kt * BLOCK_N + tl.arange(0, BLOCK_N))
            s = tl.where(rows[:, None] + N - 4 * BLOCK_N - 128 >= kidx[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    else:
        per = nt // NRUNS
        for r in range(0, NRUNS):
            for kt in tl.range(r * per, r * per + per, warp_specialize=WS):
                k = kd.load([row0 + kt * BLOCK_N, 0])
                v = vd.load([row0 + kt * BLOCK_N, 0])
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale)
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty))


def run(name, q, k, v, bn, warps, stages, dev, ws, mode, qdesc=False, maxnreg=None, bm=128, nruns=4):
    BH, N, D = q.shape
    nt = N // bn
    per = nt // nruns
    rs = torch.arange(0, nt, per, dtype=torch.int32, device=q.device)
    re_ = rs + per
    lst = torch.arange(nt, dtype=torch.int32, device=q.device)
    kidx = torch.arange(N, dtype=torch.int32, device=q.device)
    o = torch.empty_like(q)
    k2, v2 = k.view(BH * N, D), v.view(BH * N, D)
    kd = TensorDescriptor.from_tensor(k2, [bn, D])
    vd = TensorDescriptor.from_tensor(v2, [bn, D])
    grid = (N // bm, BH)
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    def call():
        return fa_kernel[grid](q, k2, v2, kd, vd, o, N, nruns, D ** -0.5 * 1.4426950408889634, rs, re_, lst, kidx,
                               HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DEV_DESC=dev, WS=ws, MODE=mode, Q_DESC=qdesc,
                               num_warps=warps, num_stages=stages, **extra)
    rec = {"name": name, "bn": bn, "warps": warps, "stages": stages, "dev": dev, "ws": ws, "mode": mode, "qdesc": qdesc, "maxnreg": maxnreg, "bm": bm}
    try:
        h = call()
        torch.cuda.synchronize()
        ttgir = h.asm["ttgir"]
        rec["ws_in_ttgir"] = "ttg.warp_specialize" in ttgir
        rec["regs"] = h.n_regs
        rec["spills"] = h.n_spills
        rec["smem"] = h.metadata.shared
        ms = triton.testing.do_bench(call, warmup=50, rep=300)
        rec["ms"] = ms
        rec["tflops"] = 4 * BH * N * N * D / ms / 1e9
        rec["out"] = o.clone()
    except Exception as e:  # noqa
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return rec


def main():
    torch.manual_seed(0)
    BH, N, D = 16, 8192, 128
    q = torch.randn(BH, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(BH, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(BH, N, D, device="cuda", dtype=torch.bfloat16)
    variants = [
        ("base_w8_s2", 64, 8, 2, False, False, 0, False, None),
        ("w8_s2_r128", 64, 8, 2, False, False, 0, False, 128),
        ("w8_s2_r120", 64, 8, 2, False, False, 0, False, 120),
        ("w8_s2_r112", 64, 8, 2, False, False, 0, False, 112),
        ("w8_s3_r128", 64, 8, 3, False, False, 0, False, 128),
        ("bm64_w4_s3", 64, 4, 3, False, False, 0, False, None, 64),
        ("bm64_w4_s2", 64, 4, 2, False, False, 0, False, None, 64),
        ("bm64_w4_s3_r128", 64, 4, 3, False, False, 0, False, 128, 64),
        ("runs_w8_s2_r128", 64, 8, 2, False, False, 2, False, 128),
        ("base_host_w8_s3", 64, 8, 3, False, False, 0),
        ("host_w4_nows", 64, 4, 3, False, False, 0),
        ("dev_w8_nows", 64, 8, 3, True, False, 0),
        ("dev_w4_ws_s2", 64, 4, 2, True, True, 0),
        ("dev_w4_ws_s3", 64, 4, 3, True, True, 0),
        ("dev_w4_ws_bn128_s2", 128, 4, 2, True, True, 0),
        ("host_w4_ws_s3", 64, 4, 3, False, True, 0),
        ("dev_w8_ws_s3", 64, 8, 3, True, True, 0),
        ("qd_dev_w4_ws_s2", 64, 4, 2, True, True, 0, True),
        ("qd_dev_w4_ws_s3", 64, 4, 3, True, True, 0, True),
        ("qd_dev_w4_ws_bn128_s2", 128, 4, 2, True, True, 0, True),
        ("qd_host_w4_ws_s3", 64, 4, 3, False, True, 0, True),
        ("qd_dev_w8_nows_s3", 64, 8, 3, True, False, 0, True),
        ("base_runs_nested", 64, 8, 3, False, False, 2),
        ("qd_dev_w4_ws_runstate_s3", 64, 4, 3, True, True, 3, True),
        ("qd_dev_w4_ws_runstate_s2", 64, 4, 2, True, True, 3, True),
        ("qd_dev_w4_ws_list_s3", 64, 4, 3, True, True, 4, True),
        ("qd_dev_w4_ws_branch_s3", 64, 4, 3, True, True, 5, True),
        ("base_branch", 64, 8, 3, False, False, 5),
        ("qd_dev_w4_ws_select_s3", 64, 4, 3, True, True, 6, True),
        ("base_select", 64, 8, 3, False, False, 6),
    ]
    import torch.nn.functional as F
    which = int(sys.argv[1])
    if which < 0:
        f = lambda: F.scaled_dot_product_attention(q[None], k[None], v[None])
        ms = triton.testing.do_bench(f, warmup=50, rep=300)
        rec = {"name": "sdpa_dense", "ms": ms, "tflops": 4 * BH * N * N * D / ms / 1e9, "triton": triton.__version__,
               "torch": torch.__version__, "device": torch.cuda.get_device_name()}
        print(json.dumps(rec), flush=True)
        if len(sys.argv) > 2:
            with open(sys.argv[2], "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        return
    vname, *args = variants[which]
    rec = run(vname, q, k, v, *args)
    out = rec.pop("out", None)
    if out is not None:
        ref = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        rec["maxdiff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
        if args[5] in (5, 6):
            rec["maxdiff_vs_sdpa"] = None  # masked variants compute something else
    rec.update({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__})
    print(json.dumps(rec), flush=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
