"""A/B of the kernels' launch schedule on one GPU: ``plan.launch_order`` with head groups (new) against
the slot order, one head at a time (old, rebuilt here by replacing the plan's orders), with dense
causal SDPA beside them. Forward replayed from a CUDA graph (GPU time) and eager forward+backward,
timed by turns (``attention.bench_group``). Usage (from the repository root)::

    python benchmarks/schedule_ab.py 8192,32768 old,new,hg1,hg2

Variants: ``old``; ``new`` (head group picked by the L2 cache); ``hgK`` (head group K). Writes
``$OUT/sched_ab_<sizes>.json`` (``OUT`` defaults to the current directory).
"""
import dataclasses, json, os, sys, torch
sys.path.insert(0, "benchmarks")
import attention as A
import domainguard as dg
from domainguard.attention import GuardedAttention, default_config

out_rows = []
A.warm_up(torch.device("cuda"))
sizes = [int(x) for x in sys.argv[1].split(",")]
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["old", "new"]
for n in sizes:
    q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    s_f, s_fb = A.run_sdpa(q, k, v, do, causal=True)
    for seg in (1000, 64):
        ids = A.segment_ids(n, seg, seed=n + seg)
        for reads in (3, 1):
            c = dg.compile(dg.loads_policy(A.policy_yaml(reads)), layers=1)
            layout = dg.Layout.from_ids(c, ids.cuda())
            pairs = A.allowed_pairs(layout, c)
            fwd, fb = {}, {}
            for var in variants:
                base = default_config(torch.bfloat16, 128)
                if var == "old":
                    g = GuardedAttention(c, dataclasses.replace(base, head_group=1))
                    p = g.plan(layout, 0, heads=16)
                    tq, tk = p.order.shape[1], p.order_t.shape[1]
                    p = dataclasses.replace(p, order=torch.arange(tq - 1, -1, -1, dtype=torch.int32, device="cuda")[None].contiguous(),
                                            order_t=torch.arange(tk, dtype=torch.int32, device="cuda")[None].contiguous())
                else:
                    hg = 0 if var == "new" else int(var[2:])
                    g = GuardedAttention(c, dataclasses.replace(base, head_group=hg))
                    p = g.plan(layout, 0, heads=16)
                f, b = A.run_ours(g, p, q, k, v, layout, do)
                fwd[var] = A.graphed(f)
                fb[var] = b
            fwd["sdpa"] = A.graphed(s_f)
            fb["sdpa"] = s_fb
            mf, sf = A.bench_group(fwd)
            mb, sb = A.bench_group(fb)
            row = {"N": n, "seg": seg, "reads": reads, "pairs": pairs, "fwd_graph_ms": mf, "fb_ms": mb,
                   "fwd_spread": sf, "fb_spread": sb}
            out_rows.append(row)
            print(json.dumps({"N": n, "seg": seg, "reads": reads,
                              "fwd_graph": {k_: round(x, 4) for k_, x in mf.items()},
                              "fb": {k_: round(x, 3) for k_, x in mb.items()}}), flush=True)
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": out_rows},
          open(os.path.join(os.environ.get("OUT", "."), f"sched_ab_{sys.argv[1].replace(',', '_')}.json"), "w"), indent=1)
