"""Where a guarded forward+backward's wall time goes on the GPU: kernels, overlap and idle gaps.

    python benchmarks/timeline.py --sizes 32768 --segments 1000 --reads 3 --json $OUT/timeline.json

For each layout it runs the guarded forward+backward a few times under the torch profiler and,
from the trace, reports per step: the span from the first kernel's start to the last one's end,
the time at least one kernel ran (the union over streams), the sum of kernel times (above the
union where the dq side stream overlaps dk/dv), and every gap of more than ``--gap-us`` during
which no kernel ran, with the kernels on either side and the host calls made during it. It lists
the host calls that block until the GPU catches up (stream, event or device synchronisation,
blocking copies; ``torch.cuda.set_sync_debug_mode`` is asked as well) and, apart from them, waits
of one stream for another (on the GPU: the host goes on). It also times the step by CUDA events,
with and without the benchmark's L2 flush before each call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import HEAD_DIM, HEADS, policy_yaml, run_ours, segment_ids, warm_up  # noqa: E402

import domainguard as dg  # noqa: E402
from domainguard.attention import GuardedAttention  # noqa: E402

HOST_WAITS = ("Synchronize", "cudaMemcpy")  # the host blocks until the GPU gets there (cudaMemcpyAsync excepted)
STREAM_WAITS = ("cudaStreamWaitEvent",)  # a stream waits for another on the GPU; the host goes on


def _trace_events(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def _steps(events: list[dict], steps: int) -> list[dict]:
    """Give each of ``steps`` consecutive steps the GPU kernels (and memcpy/memset) launched, and the CUDA
    calls made, while its host annotation ``step<i>`` was open, and summarise each."""
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith("step")
                   and e.get("ph") == "X" and e.get("cat") == "user_annotation")
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"),
                 key=lambda e: e["ts"])
    # CUDA runtime and driver calls (Triton launches through the driver API).
    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("ph") == "X"]
    # A kernel belongs to the step whose annotation was open at its launch; kernels carry their launch's
    # correlation id.
    launch_ts = {e["args"].get("correlation"): e["ts"] for e in host if "correlation" in e.get("args", {})}
    out = []
    for t0, t1 in marks[:steps]:
        ks = [e for e in gpu if t0 <= launch_ts.get(e["args"].get("correlation"), -1) < t1]
        if not ks:
            continue
        start = min(e["ts"] for e in ks)
        end = max(e["ts"] + e["dur"] for e in ks)
        busy, gaps, cur_end, prev = 0.0, [], start, None
        for e in ks:
            if e["ts"] > cur_end:
                gaps.append({"us": round(e["ts"] - cur_end, 1), "after": prev and prev["name"][:50],
                             "before": e["name"][:50],
                             "host_calls": sorted({h["name"] for h in host if cur_end <= h["ts"] <= e["ts"]
                                                   and "Launch" not in h["name"]})[:8]})
            seg_start = max(e["ts"], cur_end)
            busy += max(0.0, e["ts"] + e["dur"] - seg_start)
            if e["ts"] + e["dur"] > cur_end:
                cur_end, prev = e["ts"] + e["dur"], e
        per = {}
        for e in ks:
            per[e["name"][:50]] = per.get(e["name"][:50], 0.0) + e["dur"]
        out.append({"span_ms": round((end - start) / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
                    "kernel_sum_ms": round(sum(e["dur"] for e in ks) / 1e3, 3),
                    "launch_to_first_kernel_us": round(start - t0, 1),  # step begun on the host -> first kernel ran
                    "kernels_ms": {k: round(v / 1e3, 3) for k, v in per.items()},
                    "gaps": [g for g in gaps if g["us"] >= ARGS.gap_us],
                    "host_waits": sorted({h["name"] for h in host if t0 <= h["ts"] < t1
                                          and any(w in h["name"] for w in HOST_WAITS) and "Async" not in h["name"]}),
                    "stream_waits": sorted({h["name"] for h in host if t0 <= h["ts"] < t1
                                            and any(w in h["name"] for w in STREAM_WAITS)})})
    return out


def _event_ms(fn, reps: int, flush: torch.Tensor | None) -> list[float]:
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        if flush is not None:
            flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [round(a.elapsed_time(b), 3) for a, b in evs]


def main(argv=None) -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768")
    ap.add_argument("--segments", default="1000")
    ap.add_argument("--reads", default="3")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gap-us", type=float, default=5.0)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--json", default=None)
    ARGS = args = ap.parse_args(argv)
    dev = torch.device("cuda")
    warm_up(dev)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(info), flush=True)
    rows = []
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        for seg in (int(s) for s in args.segments.split(",")):
            for r in (int(s) for s in args.reads.split(",")):
                guard = GuardedAttention(dg.compile(dg.loads_policy(policy_yaml(r)), layers=1))
                layout = dg.Layout.from_ids(guard.compiled, segment_ids(n, seg, seed=n + seg).to(dev))
                plan = guard.plan(layout, 0, heads=HEADS, dtype=q.dtype, head_dim=HEAD_DIM)
                f, fb = run_ours(guard, plan, q, k, v, layout, do)
                step = f if args.forward_only else fb
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                syncs = sorted({str(w.message)[:200] for w in caught})
                from torch.profiler import ProfilerActivity, profile, record_function

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for i in range(args.steps):
                        with record_function(f"step{i}"):
                            step()
                    torch.cuda.synchronize()
                events = _trace_events(prof)
                steps = _steps(events, args.steps)
                row = {"N": n, "segment": seg, "reads": r, "phase": "fwd" if args.forward_only else "fwdbwd",
                       "sync_warnings": syncs, "steps": steps,
                       "events_ms_flush": _event_ms(step, 10, flush), "events_ms_no_flush": _event_ms(step, 10, None)}
                if not steps:  # say what the trace held instead
                    row["trace_categories"] = sorted({str(e.get("cat")) for e in events})
                row["median_flush"] = statistics.median(row["events_ms_flush"])
                row["median_no_flush"] = statistics.median(row["events_ms_no_flush"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
