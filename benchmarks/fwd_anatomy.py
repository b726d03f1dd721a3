"""Where the forward kernel's time goes (BENCHMARKS.md, "Masked tiles").

    python benchmarks/fwd_anatomy.py

Launches the forward kernel alone (K/V already in slot order) on the plans of the benchmark's
layouts and on doctored copies of their run tables: no tiles (the cost of the programs alone),
FULL tiles only, PARTIAL tiles only, one tile per run, runs split into pieces of at most 16 or 4
tiles (more pipeline fills over the same tiles). Also the host time of one guarded call, the K/V
copy and dense causal SDPA. One JSON line per layout. Needs a CUDA GPU.
"""
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import HEAD_DIM, HEADS, policy_yaml, segment_ids  # noqa: E402

import domainguard as dg  # noqa: E402
from domainguard.attention import GuardedAttention  # noqa: E402
from domainguard.kernels.forward import LOG2E, _fwd_kernel, dot_precision, launch_query_trust  # noqa: E402
from domainguard.kernels.permute import gather_rows  # noqa: E402
from domainguard.kernels.plan import Runs  # noqa: E402
from triton.testing import do_bench  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402


def split_runs(runs: Runs, piece: int) -> Runs:
    num, start, end = runs.num.cpu(), runs.start.cpu(), runs.end.cpu()
    rows = []
    flat_n = num.reshape(-1)
    fs, fe = start.reshape(len(flat_n), -1), end.reshape(len(flat_n), -1)
    for i in range(len(flat_n)):
        out = []
        for r in range(int(flat_n[i])):
            a, e = int(fs[i, r]), int(fe[i, r])
            while a < e:
                out.append((a, min(e, a + piece)))
                a += piece
        rows.append(out)
    R = max(1, max(len(x) for x in rows))
    S = torch.zeros(len(rows), R, dtype=torch.int32)
    E = torch.zeros(len(rows), R, dtype=torch.int32)
    N = torch.zeros(len(rows), dtype=torch.int32)
    for i, x in enumerate(rows):
        N[i] = len(x)
        for j, (a, e) in enumerate(x):
            S[i, j], E[i, j] = a, e
    dev = runs.num.device
    return Runs(num=N.view(num.shape).to(dev).contiguous(), start=S.view(*num.shape, R).to(dev).contiguous(),
                end=E.view(*num.shape, R).to(dev).contiguous())


def trim_runs(runs: Runs, keep: int) -> Runs:
    end = torch.minimum(runs.end, runs.start + keep)
    return Runs(num=runs.num, start=runs.start, end=end.contiguous())


def no_runs(runs: Runs) -> Runs:
    return Runs(num=torch.zeros_like(runs.num), start=runs.start, end=runs.end)


def main():
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(res), flush=True)
    for n, seg, reads in [(32768, 1000, 1), (32768, 1000, 3), (32768, 64, 3), (8192, 1000, 3), (8192, 1000, 1)]:
        compiled = dg.compile(dg.loads_policy(policy_yaml(reads)), layers=1)
        guard = GuardedAttention(compiled)
        layout = dg.Layout.from_ids(compiled, segment_ids(n, seg, seed=n + seg).to(dev))
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(3))
        plan = guard.plan(layout, 0, heads=HEADS, dtype=q.dtype, head_dim=HEAD_DIM)
        tables = guard.tables(0)
        cfg = plan.config
        full, part = plan.runs
        tq = full.num.shape[2]
        kp = gather_rows(k, plan.ks.tok).view(-1, HEAD_DIM)
        vp = gather_rows(v, plan.ks.tok).view(-1, HEAD_DIM)
        kd = TensorDescriptor.from_tensor(kp, [cfg.block_n, HEAD_DIM])
        vd = TensorDescriptor.from_tensor(vp, [cfg.block_n, HEAD_DIM])
        out = torch.empty_like(q)
        lse2 = torch.empty(1, HEADS, plan.qs.size, dtype=torch.float32, device=dev)
        qs, ks = plan.qs, plan.ks
        common = dict(REL=tables.rel_bits, CAUSAL=tables.causal_bits, DP=tables.dp, PAT=tables.pattern_constants,
                      HAS_PAT=tables.has_pattern, GROUP=1, HEAD_DIM=HEAD_DIM, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, PREC=dot_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        def runs_launch(f, p, check=True):
            trust, merged = launch_query_trust(qs, ks, (f, p), tables, block_m=cfg.block_m, block_n=cfg.block_n,
                                               check_full=check, merge=True)

            def go():  # one head at a time (head group 1), the plan's launch order
                _fwd_kernel[(tq * HEADS, 1)](
                    q, kp, vp, kd, vd, out, lse2, q.stride(0), q.stride(1), q.stride(2),
                    out.stride(0), out.stride(1), out.stride(2),
                    qs.tok, qs.dom, qs.idx, qs.rank, ks.dom, ks.idx, ks.rank,
                    f.num, f.start, f.end, p.num, p.start, p.end, plan.order, trust, merged,
                    HEADS, HEADS, qs.size, ks.size, tq, f.start.shape[-1], p.start.shape[-1], f.num.shape[1], 1,
                    plan_scale, USE_TMA=True, WARP_SPEC=False, **common)
            return go

        plan_scale = HEAD_DIM ** -0.5 * LOG2E

        row = {"N": n, "seg": seg, "reads": reads, "tq": tq, "full_tiles": full.tiles, "part_tiles": part.tiles,
               "full_runs_mean": float(full.num.float().mean()), "part_runs_mean": float(part.num.float().mean())}
        variants = {
            "base": runs_launch(full, part),
            "base_nocheck": runs_launch(full, part, check=False),
            "split16": runs_launch(split_runs(full, 16), split_runs(part, 16)),
            "split4": runs_launch(split_runs(full, 4), split_runs(part, 4)),
            "no_tiles": runs_launch(no_runs(full), no_runs(part)),
            "full_only": runs_launch(full, no_runs(part)),
            "part_only": runs_launch(no_runs(full), part),
            "one_tile_per_run": runs_launch(trim_runs(full, 1), trim_runs(part, 1)),
        }
        ref = None
        for name, go in variants.items():
            try:
                go()
                torch.cuda.synchronize()
                if name in ("base", "base_nocheck", "split4", "split16"):
                    o = out.clone()
                    if ref is None:
                        ref = o
                    row[name + "_bitwise_eq_base"] = bool(torch.equal(o, ref))
                row[name] = round(do_bench(go, warmup=25, rep=200, return_mode="median"), 4)
            except Exception as err:
                row[name] = f"ERR {type(err).__name__}: {str(err)[:200]}"
        ex = split_runs(full, 16)
        row["split16_runs_mean"] = float(ex.num.float().mean())
        ex = split_runs(full, 4)
        row["split4_runs_mean"] = float(ex.num.float().mean())
        # Host overhead of a whole guarded call.
        f = lambda: guard(q, k, v, layout, plan=plan)  # noqa: E731
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        row["host_us_per_call"] = round((t1 - t0) / 50 * 1e6, 1)
        row["call_bench_ms"] = round(do_bench(f, warmup=25, rep=200, return_mode="median"), 4)
        g = lambda: gather_rows(k, plan.ks.tok, v)  # noqa: E731
        row["kv_copy_ms"] = round(do_bench(g, warmup=25, rep=200, return_mode="median"), 4)
        sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        row["sdpa_causal_ms"] = round(do_bench(sd, warmup=25, rep=200, return_mode="median"), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
