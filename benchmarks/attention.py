"""Guarded attention vs FlexAttention vs SDPA on one GPU (issue 4; results in BENCHMARKS.md).

    python benchmarks/attention.py                      # the full table (N = 8K..128K)
    python benchmarks/attention.py --sizes 32768 --no-flex --configs   # per-kernel times of several configs
    python benchmarks/attention.py --sizes 32768 --window 4096          # policies with a sliding window
    python benchmarks/attention.py --sizes 8192 --graph                 # forwards replayed from CUDA graphs
    python benchmarks/attention.py --sizes 8192 --host                  # host time of each eager call
    python benchmarks/attention.py --power-log smi.csv                  # also SM clock / power cap per contender

Layouts: 8 domains in random segments (geometric lengths, mean 1000 or 64 tokens),
each segment's domain drawn uniformly; policies where each domain reads 1 or 3 other
domains (and itself); causal everywhere. bf16, batch 1, 16 heads, head dim 128 (``--dtype`` and
``--head-dim`` change the last two; SWEEP has float32 candidates for ``--configs``).
Effective TFLOP/s count allowed (query, key) pairs only: 4·D·H per pair forward,
3.5× that forward+backward; dense causal SDPA is credited its N(N+1)/2 causal pairs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import sys
import time

import torch

import domainguard as dg
from domainguard.attention import GuardedAttention, KernelConfig, default_config

HEADS, HEAD_DIM, DOMAINS = 16, 128, 8


# --- workloads -------------------------------------------------------------------------------
def policy_yaml(reads: int, seed: int = 0, window: int | None = None) -> str:
    rng = random.Random(seed)
    names = [f"d{i}" for i in range(DOMAINS)]
    lines = ["domainguard: 1", f"name: bench-reads{reads}", "domains:"]
    lines += [f"  {n}: {{}}" for n in names]
    lines.append("reads:")
    for i, n in enumerate(names):
        others = rng.sample([m for j, m in enumerate(names) if j != i], reads)
        lines.append(f"  {n}: [{', '.join(others)}]")
    lines += ["patterns:", "  default: {causal: true%s}" % (f", window: {window}" if window else "")]
    return "\n".join(lines) + "\n"


def segment_ids(n: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """[1, n] domain ids: segments of geometric length (mean ``mean_len``), uniform random domains."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, dtype=torch.long)
    pos = 0
    p = 1.0 / mean_len
    while pos < n:
        u = float(torch.rand((), generator=g))
        length = max(1, int(math.ceil(math.log(max(u, 1e-12)) / math.log(1 - p))))
        ids[pos : pos + length] = int(torch.randint(DOMAINS, (), generator=g))
        pos += length
    return ids[None, :n]


def allowed_pairs(layout, compiled, layer: int = 0, window: int | None = None) -> int:
    """Number of allowed (query, key) pairs, in O(N·D) (causal ∧ relation ∧ the window if any)."""
    dom = layout.domain_ids[0].cpu()
    rel = compiled.relation(layer)[:DOMAINS, :DOMAINS].to(torch.float64)
    onehot = torch.nn.functional.one_hot(dom, DOMAINS).to(torch.float64)
    before = onehot.cumsum(0)  # keys of each domain at index <= i
    if window:  # minus those at index <= i - window
        before = before - torch.nn.functional.pad(before, (0, 0, window, 0))[: before.shape[0]]
    return int((before * rel[dom]).sum().item())


# --- timing ----------------------------------------------------------------------------------
REPS = 15  # timed runs per contender at least; a 100 ms budget adds more for short calls
ROUNDS = 3  # a layout's contenders take turns this many times (``bench_group``)


def _estimate_ms(fn) -> float:
    """Milliseconds of one call (after one untimed call), by the host clock with the GPU drained."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return max((time.perf_counter() - t0) * 1e3, 1e-3)


def bench(fn, reps: int = REPS) -> float:
    """Median milliseconds of ``triton.testing.do_bench`` over at least ``reps`` timed runs (L2 flushed
    before each). do_bench sizes its run count from a time budget; with the default 100 ms a call of
    80 ms was timed once, so the budget grows with the call."""
    from triton.testing import do_bench

    est = _estimate_ms(fn)
    return float(do_bench(fn, warmup=max(50.0, 2 * est), rep=max(100.0, reps * est), return_mode="median"))


def turn_order(names, turn: int) -> list:
    """The order in which contenders take turn ``turn``: as given on even turns, reversed on odd
    ones, so none is always timed first (or always right after the same one)."""
    return list(names) if turn % 2 == 0 else list(reversed(names))


def bench_group(fns: dict, reps: int = REPS, rounds: int = ROUNDS, warmup_ms: float = 25.0,
                window=None) -> tuple[dict, dict]:
    """Time several contenders against each other: ``rounds`` turns each, in alternating order; each
    turn first calls its contender untimed for ``warmup_ms`` (at least once), then times it (CUDA
    events, a 256 MiB L2 flush before each call, as do_bench does), ``reps`` runs per contender at
    least and 100 ms of runs at least. Returns (median ms, {quartiles, per-turn medians}) per name.
    Taking turns keeps a drift of the GPU's clocks over a long run from favouring whichever
    contender was timed first. ``window(name)``: a context manager around each turn's timed calls
    (``gpu_power.PowerLog.window``)."""
    import contextlib
    import statistics

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    count, warm = {}, {}
    for name, fn in fns.items():
        est = _estimate_ms(fn)
        count[name] = max(math.ceil(reps / rounds), math.ceil(100.0 / rounds / est))
        warm[name] = max(1, math.ceil(warmup_ms / est))
    samples = {name: [] for name in fns}
    turns = {name: [] for name in fns}
    for turn in range(rounds):
        for name in turn_order(fns, turn):
            fn = fns[name]
            for _ in range(warm[name]):
                fn()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(count[name])]
            with window(name) if window else contextlib.nullcontext():
                for start, end in events:
                    flush.zero_()
                    start.record()
                    fn()
                    end.record()
                torch.cuda.synchronize()
            got = [a.elapsed_time(b) for a, b in events]
            samples[name] += got
            turns[name].append(round(statistics.median(got), 4))
    med = {name: statistics.median(v) for name, v in samples.items()}
    spread = {name: {"quartiles": [round(q, 4) for q in statistics.quantiles(v, n=4)[::2]], "turns": turns[name]}
              for name, v in samples.items()}
    return med, spread


def tflops(pairs: float, ms: float, factor: float = 1.0) -> float:
    return 4.0 * HEAD_DIM * HEADS * pairs * factor / (ms * 1e-3) / 1e12


def graphed(fn):
    """``fn`` (a forward, run without autograd) captured once in a CUDA graph after a warm-up on a
    side stream; returns the graph's replay, which launches the same kernels with no host work."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
    return graph.replay


# --- contenders --------------------------------------------------------------------------------
def _fresh_grads(*xs):
    """Drop the inputs' ``.grad`` before a backward, as a training step does (``zero_grad()`` sets
    them to None by default): the gradients are then stored, not added to the last call's, and the
    three elementwise additions (0.39 ms at 32K) are not timed as part of any contender."""
    for x in xs:
        x.grad = None


def run_ours(guard, plan, q, k, v, layout, do):
    fwd = lambda: guard(q, k, v, layout, plan=plan)  # noqa: E731

    def fwd_bwd():
        _fresh_grads(q, k, v)
        out = guard(q, k, v, layout, plan=plan)
        out.backward(do)

    return fwd, fwd_bwd


def run_flex(block_mask, q, k, v, do, flex):
    fwd = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731

    def fwd_bwd():
        _fresh_grads(q, k, v)
        out = flex(q, k, v, block_mask=block_mask)
        out.backward(do)

    return fwd, fwd_bwd


def run_sdpa(q, k, v, do, *, causal: bool, mask=None):
    import torch.nn.functional as F

    fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # noqa: E731

    def fwd_bwd():
        _fresh_grads(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out.backward(do)

    return fwd, fwd_bwd


def main(argv=None) -> int:
    global HEAD_DIM  # the workload's head dim (--head-dim; tflops() counts with it)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8192,32768,65536,131072")
    ap.add_argument("--segments", default="1000,64")
    ap.add_argument("--reads", default="1,3")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--window", type=int, default=None, help="every domain's pattern gets this sliding window")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--mask-limit-gb", type=float, default=8.0, help="skip SDPA+bool mask above this N*N size")
    ap.add_argument("--configs", action="store_true", help="per-kernel times of the SWEEP configs instead")
    ap.add_argument("--sweep", default=None, help="with --configs: only these SWEEP names (comma-separated)")
    ap.add_argument("--totals", action="store_true",
                    help="with --configs: also each config's whole forward and forward+backward (taking turns)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="with --configs: rounds of per-kernel profiles, the configs taking turns (median reported)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tune", action="store_true", help="pick the faster forward config on a 32K layout first")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time of one forward+backward instead")
    ap.add_argument("--host", action="store_true",
                    help="host time of each contender's eager call (enqueue only, GPU drained between calls) instead")
    ap.add_argument("--power-log", default=None, metavar="CSV",
                    help="sample nvidia-smi (SM clock, power, clock-limit reasons) into CSV while timing, and add "
                         "each contender's median clock and power-capped share to its row")
    ap.add_argument("--graph", action="store_true",
                    help="every contender's forward captured in a CUDA graph and replayed (no host cost); implies "
                         "--no-backward")
    args = ap.parse_args(argv)
    if args.graph:
        args.no_backward = True
    g = graphed if args.graph else (lambda fn: fn)
    HEAD_DIM = args.head_dim
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    power = None
    if args.power_log:
        from gpu_power import PowerLog

        power = PowerLog.start(args.power_log)
        if power is None:
            print("--power-log: nvidia-smi not found; no power samples", file=sys.stderr)
    warm_up(dev)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    segs = [int(s) for s in args.segments.split(",")]
    reads = [int(s) for s in args.reads.split(",")]
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "dtype": args.dtype,
        "head_dim": HEAD_DIM,
        "cuda_graph": args.graph,
    }
    print(json.dumps(info), flush=True)
    policies = {r: dg.compile(dg.loads_policy(policy_yaml(r, window=args.window)), layers=1) for r in reads}
    config = None
    if args.tune:
        config = tune(policies[max(reads)], dev, dtype)
        info["config"] = repr(config)
        print(json.dumps({"tuned": repr(config)}), flush=True)
    guards = {r: GuardedAttention(c, config) for r, c in policies.items()}
    for n in sizes:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=dtype) for _ in range(3))
        for t in (q, k, v):
            t.requires_grad_(True)
        do = torch.randn_like(q)
        causal_pairs = n * (n + 1) / 2
        s_f, s_fb = run_sdpa(q, k, v, do, causal=True)
        sd = None  # --profile / --configs: dense causal SDPA timed once per N, for reference
        for seg in segs:
            ids = segment_ids(n, seg, seed=n + seg)
            for r in reads:
                compiled, guard = policies[r], guards[r]
                layout = dg.Layout.from_ids(compiled, ids.to(dev))
                pairs = allowed_pairs(layout, compiled, window=args.window)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                plan = guard.plan(layout, 0, heads=HEADS, dtype=q.dtype, head_dim=HEAD_DIM)
                torch.cuda.synchronize()
                plan_ms = (time.perf_counter() - t0) * 1e3
                row = {"N": n, "segment": seg, "reads": r, "window": args.window, "pairs": pairs, "density": pairs / causal_pairs,
                       "plan_ms": plan_ms, **plan.stats()}
                if (args.profile or args.configs) and sd is None:
                    sd = {"fwd": bench(g(s_f)), "fwdbwd": None if args.no_backward else bench(s_fb)}
                if sd is not None:
                    row["sdpa_causal"] = sd
                if args.profile:
                    row["kernels_ms"] = profile_kernels(guard, plan, q, k, v, layout, do)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                if args.host:
                    bm = dg.build_blockmap(layout, compiled, 0).to_flex_block_mask() if flex is not None else None
                    row["host_us"] = host_times(guard, plan, q, k, v, layout, do, flex, bm, s_f, s_fb)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                if args.configs:
                    names = args.sweep.split(",") if args.sweep else list(SWEEP)
                    row["configs"] = time_configs(guard, layout, q, k, v, pairs, names, totals=args.totals,
                                                  rounds=args.rounds)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                # ours, FlexAttention and dense causal SDPA take turns (bench_group), forward and
                # forward+backward separately.
                o_f, o_fb = run_ours(guard, plan, q, k, v, layout, do)
                fwd_fns, fb_fns = {"ours": g(o_f)}, {"ours": o_fb}
                if flex is not None:
                    bm = dg.build_blockmap(layout, compiled, 0).to_flex_block_mask()
                    f_f, f_fb = run_flex(bm, q, k, v, do, flex)
                    with torch.no_grad():
                        err = (flex(q, k, v, block_mask=bm).float() - o_f().float()).abs().max().item()
                    row["max_abs_diff_vs_flex"] = err
                    fwd_fns["flex"], fb_fns["flex"] = g(f_f), f_fb
                fwd_fns["sdpa_causal"], fb_fns["sdpa_causal"] = g(s_f), s_fb
                win = (lambda phase: functools.partial(power.window, (n, seg, r), phase)) if power else (lambda phase: None)
                med_f, spread_f = bench_group(fwd_fns, window=win("fwd"))
                med_fb, spread_fb = bench_group(fb_fns, window=win("fwdbwd")) if not args.no_backward else ({}, {})
                for who in fwd_fns:
                    row[who] = {"fwd": med_f[who], "fwdbwd": med_fb.get(who)}
                    row[f"{who}_spread"] = {"fwd": spread_f[who], "fwdbwd": spread_fb.get(who)}
                    row[f"{who}_tflops"] = {
                        kk: tflops(causal_pairs if who == "sdpa_causal" else pairs, ms, 1.0 if kk == "fwd" else 3.5)
                        if ms else None for kk, ms in row[who].items()}
                if n * n / 2**30 <= args.mask_limit_gb:
                    # relation[d_i, d_j] AND j <= i, built without N x N index tensors.
                    dom = layout.domain_ids[0]
                    mask = compiled.relation(0).to(dev)[dom][:, dom]
                    mask.tril_()
                    if args.window:
                        mask.triu_(-(args.window - 1))
                    mask = mask[None, None]
                    m_f, m_fb = run_sdpa(q, k, v, do, causal=False, mask=mask)
                    row["sdpa_mask"] = {"fwd": bench(g(m_f)), "fwdbwd": None if args.no_backward else bench(m_fb)}
                    del mask
                else:
                    row["sdpa_mask"] = "skipped: N x N mask too large"
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    if power is not None:
        power.stop()
        info["power_log"] = args.power_log
        for (label, phase, who), summary in power.summaries().items():
            row = next(x for x in rows if (x["N"], x["segment"], x["reads"]) == label)
            row.setdefault("power", {}).setdefault(phase, {})[who] = summary
    if args.profile:
        info["kernels"] = kernel_resources()
        print(json.dumps(info["kernels"]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)
    print_table(info, rows)
    return 0


def warm_up(dev, seconds: float = 3.0) -> None:
    """Keep the GPU busy for a few seconds before the first timing: the first layout of a run was
    measured up to 25% slow without it (clocks still rising)."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def tune(compiled, dev, dtype=torch.bfloat16, n: int = 32768) -> KernelConfig:
    """The faster of the candidate forward configs on a fragmented 32K layout (forward time)."""
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=dtype) for _ in range(3))
    layout = dg.Layout.from_ids(compiled, segment_ids(n, 64, seed=1).to(dev))
    import dataclasses

    base = default_config(q.dtype, HEAD_DIM)
    candidates = [base, dataclasses.replace(base, use_tma=not base.use_tma)]
    best, best_ms = None, float("inf")
    for cfg in candidates:
        g = GuardedAttention(compiled, cfg)
        plan = g.plan(layout, 0, heads=HEADS, dtype=q.dtype, head_dim=HEAD_DIM)
        ms = bench(lambda: g(q, k, v, layout, plan=plan))
        print(json.dumps({"tune": repr(cfg), "fwd_ms": ms}), flush=True)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def host_times(guard, plan, q, k, v, layout, do, flex, block_mask, s_f, s_fb, reps: int = 30) -> dict:
    """Microseconds of host time per eager call (quartiles over ``reps`` calls): the time to return from
    the call, with the GPU drained before each, so the host never waits on a full launch queue. A call
    whose host time nears its GPU time leaves the GPU idle between launches (the 8K rows)."""
    import statistics

    fns = dict(zip(("ours_fwd", "ours_fwdbwd"), run_ours(guard, plan, q, k, v, layout, do)))
    if flex is not None:
        fns.update(zip(("flex_fwd", "flex_fwdbwd"), run_flex(block_mask, q, k, v, do, flex)))
    fns.update(sdpa_causal_fwd=s_f, sdpa_causal_fwdbwd=s_fb)
    out = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        got = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            got.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        out[name] = [round(x) for x in statistics.quantiles(got, n=4)]
    return out


def profile_kernels(guard, plan, q, k, v, layout, do, iters: int = 10, totals: bool = True) -> dict:
    """GPU milliseconds per forward+backward step of each kernel launched (torch profiler), plus
    do_bench medians of the whole forward and forward+backward, and the kernels' resource use."""
    from torch.profiler import ProfilerActivity, profile

    f, fb = run_ours(guard, plan, q, k, v, layout, do)
    out = {"fwd_total": bench(f), "fwdbwd_total": bench(fb)} if totals else {}
    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fb()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            out[ev.key[:60]] = ev.device_time_total / iters / 1e3
    return out


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled guarded-attention kernel."""
    from domainguard.kernels import backward, forward, permute

    res = {}
    for mod in (forward, backward, permute):
        for name in dir(mod):
            fn = getattr(mod, name)
            for cache in getattr(fn, "device_caches", {}).values():
                for i, ck in enumerate(cache[0].values()):
                    res[f"{name}#{i}"] = {"regs": ck.n_regs, "spills": ck.n_spills, "smem": ck.metadata.shared,
                                          "warps": ck.metadata.num_warps}
    return res


def _bwd(dkdv, dq):
    """KernelConfig.dkdv / .dq tuples from (SUB_N, SUB_M, warps, stages) and (SUB_M, SUB_N, warps, stages)."""
    return dict(dkdv=(("SUB_N", dkdv[0]), ("SUB_M", dkdv[1]), ("num_warps", dkdv[2]), ("num_stages", dkdv[3])),
                dq=(("SUB_M", dq[0]), ("SUB_N", dq[1]), ("num_warps", dq[2]), ("num_stages", dq[3])))


SWEEP = {  # name: KernelConfig overrides (the measured outcomes are in BENCHMARKS.md)
    "default": {},
    "fwd_triton": dict(fwd_gluon=False),  # the Triton forward on sm_90 too (the default before kernels/forward_sm90.py)
    "fwd_gluon_per1": dict(fwd_gluon_per=1),  # the Gluon forward in 64-key steps
    "fwd_gather_s3": dict(use_tma=False),
    "fwd_gather_s4": dict(use_tma=False, num_stages=4),
    "fwd_tma_bn128_s2": dict(block_n=128, num_stages=2),
    "fwd_tma_s4": dict(num_stages=4),
    "fwd_bm64_w4": dict(block_m=64, num_warps=4),
    "fwd_nocheck": dict(check_full=False),  # cost of the in-kernel FULL-tile relation check (not a candidate)
    "fwd_tma_s2": dict(num_stages=2),
    "dq_triton": dict(dq_gluon=False),  # the Triton dq kernel on sm_90 too
    "dq_gluon_s2": dict(dq=(("SUB_M", 128), ("SUB_N", 64), ("num_warps", 8), ("num_stages", 3), ("GLUON_STAGES", 2))),
    "dq_ptr": dict(dq_tma=False, dq_gluon=False),  # dq reading K/V by pointer loads (the default before the descriptors)
    "bwd_one_stream": dict(bwd_concurrent=False),  # dq after dk/dv on one stream (compare with --totals)
    "bwd_a": _bwd((64, 64, 8, 2), (64, 32, 4, 3)),
    "bwd_b": _bwd((32, 64, 4, 3), (128, 64, 8, 2)),
    "bwd_c": _bwd((64, 32, 8, 3), (128, 32, 8, 3)),
    "bwd_d": _bwd((64, 32, 4, 2), (64, 64, 8, 3)),
    "bwd_e": _bwd((64, 16, 4, 3), (64, 64, 4, 2)),
    "bwd_f": _bwd((64, 32, 4, 4), (64, 64, 4, 2)),
    "bwd_g": _bwd((64, 32, 4, 3), (64, 32, 4, 3)),
    # dk/dv's unmasked FULL runs in 64-query steps (m64n64 products), masked runs in 32-query steps
    "dkdv_full64": dict(dkdv=(("SUB_N", 64), ("SUB_M", 32), ("FULL_M", 64), ("num_warps", 4), ("num_stages", 3))),
    "dkdv_full64_s2": dict(dkdv=(("SUB_N", 64), ("SUB_M", 32), ("FULL_M", 64), ("num_warps", 4), ("num_stages", 2))),
    # ... with the FULL loop in 2 stages and the masked loops in 3
    "dkdv_full64_f2": dict(dkdv=(("SUB_N", 64), ("SUB_M", 32), ("FULL_M", 64), ("FULL_STAGES", 2), ("num_warps", 4),
                                 ("num_stages", 3))),
    # masked runs in 16-query steps (fewer registers), FULL runs in 32- / 64-query steps
    "dkdv_m16_full32": dict(dkdv=(("SUB_N", 64), ("SUB_M", 16), ("FULL_M", 32), ("num_warps", 4), ("num_stages", 3))),
    "dkdv_m16_full64": dict(dkdv=(("SUB_N", 64), ("SUB_M", 16), ("FULL_M", 64), ("FULL_STAGES", 2), ("num_warps", 4),
                                  ("num_stages", 3))),
    # 128-key programs (8 warps, two warpgroups of 64 keys sharing Q/dO): FULL runs in 64-query steps
    "kt128_full64_f2": dict(dkdv=(("SUB_N", 128), ("SUB_M", 32), ("FULL_M", 64), ("FULL_STAGES", 2), ("num_warps", 8),
                                  ("num_stages", 3))),
    "kt128_m32_s3_dkdv": dict(dkdv=(("SUB_N", 128), ("SUB_M", 32), ("num_warps", 8), ("num_stages", 3))),
    # dk/dv programs of 128 keys (key-major tables merged over two 64-key tiles); 4 warps spill KBs
    "kt128_m16_s2": _bwd((128, 16, 8, 2), (64, 64, 4, 2)),
    "kt128_m16_s3": _bwd((128, 16, 8, 3), (64, 64, 4, 2)),
    "kt128_m32_s2": _bwd((128, 32, 8, 2), (64, 64, 4, 2)),
    "kt128_m32_s3": _bwd((128, 32, 8, 3), (64, 64, 4, 2)),
    # float32 (--dtype float32): forward tile shapes (block_m, block_n, warps) and stages, over default_config(float32, d)
    "fp32_bm64_w4": dict(block_m=64, num_warps=4),
    "fp32_bm64_w8": dict(block_m=64, num_warps=8),
    "fp32_bm32_w4": dict(block_m=32, num_warps=4),
    "fp32_bm32_w8": dict(block_m=32, num_warps=8),
    "fp32_bm32_bn32_w8": dict(block_m=32, block_n=32, num_warps=8),
    "fp32_s1": dict(num_stages=1),
    "fp32_s3": dict(num_stages=3),
    "fp32_bwd_w8": _bwd((32, 32, 8, 1), (32, 32, 8, 1)),
    "fp32_bwd_s2": _bwd((32, 32, 4, 2), (32, 32, 4, 2)),
    "fp32_bwd_16": _bwd((32, 16, 4, 1), (16, 32, 4, 1)),
}


def time_configs(guard, layout, q, k, v, pairs, names=tuple(SWEEP), totals=False, rounds=4):
    """Per-kernel GPU ms of one forward+backward for each named configuration of SWEEP (torch profiler).

    The configurations take turns: ``rounds`` rounds of 3 profiled steps each, in alternating order,
    and each kernel's time is the median over rounds (with every round's value kept). Profiled one
    after another, the same kernels read up to 4% apart on an H100 depending on which came first:
    the power cap lowers the clock as a run goes on (BENCHMARKS.md). ``totals``: also the whole
    forward and forward+backward, timed by ``bench_group`` (turns as well)."""
    import dataclasses
    import statistics

    out, ready = {}, {}
    do = torch.randn_like(q)
    base = default_config(q.dtype, q.shape[-1])
    ref_out = ref_grads = None
    unknown = sorted(set(names) - set(SWEEP))
    if unknown:
        raise SystemExit(f"--sweep: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(SWEEP)}")
    for name in names:  # build, compile and check each first; a failure is reported and the rest go on
        seen = set(kernel_resources())
        try:
            g = GuardedAttention(guard.compiled, dataclasses.replace(base, **SWEEP[name]))
            plan = g.plan(layout, 0, heads=q.shape[1], dtype=q.dtype, head_dim=q.shape[-1])
            with torch.no_grad():
                got = g(q, k, v, layout, plan=plan)
            ref_out = got if ref_out is None else ref_out
            run_ours(g, plan, q, k, v, layout, do)[1]()  # compiles the backward
            torch.cuda.synchronize()
            grads = [x.grad.float() for x in (q, k, v)]
            ref_grads = grads if ref_grads is None else ref_grads
            out[name] = {"max_diff_vs_default": (got.float() - ref_out.float()).abs().max().item(),
                         # dq, dk, dv: largest difference over the default's largest magnitude
                         "grad_rel_diff_vs_default": [float(f"{((a - r).abs().max() / r.abs().max()).item():.3g}")
                                                      for a, r in zip(grads, ref_grads)],
                         "compiled": {kk: vv for kk, vv in kernel_resources().items() if kk not in seen}}
            ready[name] = (g, plan)
        except Exception as err:  # report and go on: this is a sweep
            out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(json.dumps({name: out[name]}), flush=True)
    per_round = {name: {} for name in ready}
    for turn in range(rounds):
        for name in turn_order(ready, turn):
            g, plan = ready[name]
            for kk, vv in profile_kernels(g, plan, q, k, v, layout, do, iters=3, totals=False).items():
                if kk.startswith("_"):
                    per_round[name].setdefault(kk, []).append(round(vv, 4))
    if totals and ready:
        fns = {name: run_ours(g, plan, q, k, v, layout, do) for name, (g, plan) in ready.items()}
        med_f, _ = bench_group({name: f for name, (f, _) in fns.items()})
        med_fb, _ = bench_group({name: fb for name, (_, fb) in fns.items()})
    for name in ready:
        res = {kk: round(statistics.median(vv), 4) for kk, vv in per_round[name].items()}
        if totals:
            res.update(fwd_total=med_f[name], fwdbwd_total=med_fb[name])
        out[name] = {**res, **out[name], "rounds": per_round[name]}
        print(json.dumps({name: {kk: vv for kk, vv in out[name].items() if kk != "rounds"}}), flush=True)
    return out


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def print_table(info, rows):
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}; "
          f"{info['dtype']}, head dim {info['head_dim']}" + ("; forwards replayed from CUDA graphs" if info.get("cuda_graph") else ""))
    hdr = ("| N | seg | reads | density | ours fwd ms | TF/s | flex fwd ms | TF/s | vs flex | SDPA causal ms | TF/s | "
           "ours/SDPA TF | SDPA mask ms | ours f+b ms | TF/s | flex f+b ms | vs flex | SDPA causal f+b ms |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        if "ours" not in r:
            continue
        o, ot = r["ours"], r["ours_tflops"]
        fl, ft = r.get("flex", {}), r.get("flex_tflops", {})
        sd, st = r["sdpa_causal"], r["sdpa_causal_tflops"]
        sm = r["sdpa_mask"]
        sm_f = sm["fwd"] if isinstance(sm, dict) else None
        vs = fl.get("fwd") / o["fwd"] if fl.get("fwd") else None
        vsb = fl.get("fwdbwd") / o["fwdbwd"] if fl.get("fwdbwd") and o.get("fwdbwd") else None
        print(
            f"| {r['N']//1024}K | {r['segment']} | {r['reads']} | {r['density']:.3f} | {_fmt(o['fwd'])} | {_fmt(ot['fwd'],0)} | "
            f"{_fmt(fl.get('fwd'))} | {_fmt(ft.get('fwd'),0)} | {_fmt(vs)}× | {_fmt(sd['fwd'])} | {_fmt(st['fwd'],0)} | "
            f"{_fmt(ot['fwd'] / st['fwd'] if st['fwd'] else None)} | {_fmt(sm_f) if sm_f else 'skip'} | {_fmt(o.get('fwdbwd'))} | "
            f"{_fmt(ot.get('fwdbwd'),0)} | {_fmt(fl.get('fwdbwd'))} | {_fmt(vsb)}× | {_fmt(sd.get('fwdbwd'))} |"
        )
    powered = [r for r in rows if "power" in r]
    if powered:
        who = ("ours", "flex", "sdpa_causal")
        print("\nSM clock (median MHz) and share of nvidia-smi samples with the power cap active, per contender's turns:")
        print("| N | seg | reads | phase | " + " | ".join(who) + " |")
        print("|" + "---|" * (4 + len(who)))
        for r in powered:
            for phase, by in r["power"].items():
                cells = [f"{by[w]['sm_mhz']:.0f} MHz, {100 * by[w]['power_capped']:.0f}%" if by.get(w, {}).get("samples")
                         else "—" for w in who]
                print(f"| {r['N']//1024}K | {r['segment']} | {r['reads']} | {phase} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
