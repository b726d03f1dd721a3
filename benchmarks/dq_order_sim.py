"""How long would dk/dv programs wait if dq were summed inside them in a fixed order? A schedule model, no GPU.

dq is computed by a kernel of its own, which recomputes S and dP (2 of the 9 matrix products of a
forward+backward), because dk/dv programs that added their dq rows with atomics would add them in
whatever order they ran: gradients would change from run to run, and the bitwise poisoning guarantee
with them. A deterministic alternative adds each query tile's contributions in a fixed order: a
program adds its rows of a query tile only after every program before it in that order has added
its own (a counter per tile). To stay free of deadlock the order must be the order in which programs
start: each takes a ticket, and ticket k runs key tile ``order[k]``, so whatever a program waits for
is already running.

This script replays that protocol on the real key-major tables of a plan (``plan.runs_t``, one mask
head, ``heads`` attention heads one after another as ``_schedule`` runs them at 32K): ``slots``
programs run at once, each visits the query tiles its tables list at a fixed cost per tile (FULL 4,
PARTIAL 5, i.e. four 32-row steps with masked ones a little dearer; ``plan.launch_order`` weighs them
2 : 3 for scheduling), and a tile's rows are added between tile steps, once the previous contributor's
are in. Adds themselves cost nothing here. Ticket orders: ``heaviest first`` (``plan.launch_order``,
the kernels' order), ``lightest first`` (its reverse), ``last key tiles first`` (descending key tile
index). Visiting orders:

* ``split``: FULL runs, then PARTIAL runs (how ``_dkdv_kernel`` walks its tables);
* ``inc`` / ``dec``: every listed tile in increasing / decreasing tile index;
* ``inc, ring K``: ``inc``, holding back up to K tiles' rows whose turn has not come (a program blocks
  when a (K+1)th would be held back); held-back rows are added at the first step boundary after their
  turn, and at the program's end.

It prints each makespan over the same schedule's with nobody waiting. Usage (from the repository root,
CPU only)::

    python benchmarks/dq_order_sim.py --sizes 32768 --segments 1000,64 --json benchmarks/results/dq_order_sim.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as A  # noqa: E402  (policy_yaml, segment_ids: the benchmark's layouts)

import domainguard as dg  # noqa: E402
from domainguard.attention import GuardedAttention  # noqa: E402

COST = (4.0, 5.0)  # FULL, PARTIAL tile (4 steps of 32 query rows; a masked step costs more)


def key_tiles(plan) -> dict:
    """Key tile -> [(query tile, kind)] of the key-major tables (batch 0, mask head 0), FULL runs first."""
    out = {}
    full_t, part_t = plan.runs_t
    for u in range(full_t.num.shape[2]):
        tiles = []
        for kind, runs in enumerate((full_t, part_t)):
            for r in range(int(runs.num[0, 0, u])):
                tiles += [(t, kind) for t in range(int(runs.start[0, 0, u, r]), int(runs.end[0, 0, u, r]))]
        out[u] = tiles
    return out


def visit(tiles: list, how: str) -> list:
    if how == "split":
        return tiles
    return sorted(tiles, reverse=how == "dec")


def simulate(tiles: dict, order: list, how: str, *, slots: int, heads: int, ring: int = 0,
             wait: bool = True) -> float:
    """Makespan of the ticket-ordered protocol (programs start in ``order``, head after head); ``wait=False``:
    the same schedule with nobody waiting (the baseline the ratios are taken over)."""
    done = {}  # (head, query tile) -> when its last contributor so far added its rows
    free = [0.0] * slots
    end = 0.0
    for h in range(heads):
        for u in order:
            now = heapq.heappop(free)
            pending = []  # (turn, query tile): rows held back until the tile's previous contributor has added
            for t, kind in visit(tiles[u], how):
                now += COST[kind]
                if not wait:
                    continue
                pending.append((max(now, done.get((h, t), 0.0)), t))
                if len(pending) > ring:  # no room to hold this one back too: block for the earliest turn
                    now = max(now, min(pending)[0])
                # Rows are added between tile steps: every held-back tile whose turn has come is added now.
                for turn, q in [x for x in pending if x[0] <= now]:
                    done[(h, q)] = now
                pending = [x for x in pending if x[0] > now]
            for turn, q in sorted(pending):  # the program's end: add the rest as their turns come
                now = max(now, turn)
                done[(h, q)] = now
            heapq.heappush(free, now)
            end = max(end, now)
    return end


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32768")
    ap.add_argument("--segments", default="1000,64")
    ap.add_argument("--reads", type=int, default=3)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--slots", type=int, default=264, help="programs running at once (H100: 132 SMs x 2)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    compiled = dg.compile(dg.loads_policy(A.policy_yaml(args.reads)), layers=1)
    guard = GuardedAttention(compiled)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for seg in (int(s) for s in args.segments.split(",")):
            layout = dg.Layout.from_ids(compiled, A.segment_ids(n, seg, seed=n + seg))
            plan = guard.plan(layout, 0, heads=args.heads, dtype=torch.bfloat16, head_dim=128)
            tiles = key_tiles(plan)
            heavy = plan.order_t[0].tolist()  # the kernels' launch order: heaviest key tiles first
            orders = {"heaviest first": heavy, "lightest first": heavy[::-1],
                      "last key tiles first": sorted(tiles, reverse=True)}
            row = {"N": n, "segment": seg, "reads": args.reads, "ratio": {}}
            for name, order in orders.items():
                base = simulate(tiles, order, "split", slots=args.slots, heads=args.heads, wait=False)
                for how in ("split", "inc", "dec"):
                    row["ratio"][f"{name}, {how}"] = simulate(tiles, order, how, slots=args.slots,
                                                              heads=args.heads) / base
                for ring in (2, 8, 32):
                    row["ratio"][f"{name}, inc, ring {ring}"] = simulate(tiles, order, "inc", slots=args.slots,
                                                                          heads=args.heads, ring=ring) / base
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "slots": args.slots,
                                         "heads": args.heads, "cost": COST, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
