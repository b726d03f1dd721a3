"""How long would dk/dv programs wait if dq were summed inside them in a fixed order? A schedule model, no GPU.

dq is computed by a kernel of its own, which recomputes S and dP (2 of the 9 matrix products of a
forward+backward), because dk/dv programs that added their dq rows with atomics would add them in
whatever order they ran: gradients would change from run to run, and the bitwise poisoning guarantee
with them. A deterministic alternative adds each query tile's contributions in a fixed order: a
program waits, at each query tile, until every program before it in that order has added its rows
(a counter per tile). To stay free of deadlock the order must be the order in which programs start
(a ticket), so whatever a program waits for is already running.

This script replays that protocol on the real key-major tables of a plan (``plan.runs_t``, one mask
head, ``heads`` attention heads one after another as ``_schedule`` runs them at 32K): ``slots``
programs run at once, each visits its query tiles at a fixed cost per tile (FULL 4, PARTIAL 5: 32-row
steps), and a tile's rows are added only after the previous contributor's. It reports the makespan over
the ideal (total work spread over the slots) for each ticket order and visiting order:

* ``split``: FULL runs, then PARTIAL runs (how ``_dkdv_kernel`` walks its tables);
* ``inc`` / ``dec``: every listed tile in increasing / decreasing tile index;
* ``ring K``: ``inc``, with up to K tiles' rows held back while their turn has not come (a program then
  blocks only when K are pending).

Usage (from the repository root, CPU only)::

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


def simulate(tiles: dict, order: list, how: str, *, slots: int, heads: int, ring: int = 0) -> float:
    """Makespan over the ideal of the ticket-ordered protocol (programs start in ``order``, head after head)."""
    done = {}  # (head, query tile) -> when its last contributor so far added its rows
    free = [0.0] * slots
    work = 0.0
    end = 0.0
    for h in range(heads):
        for u in order:
            now = heapq.heappop(free)
            pending = []  # when held-back tiles' turns come
            for t, kind in visit(tiles[u], how):
                now += COST[kind]
                work += COST[kind]
                turn = max(now, done.get((h, t), 0.0))
                done[(h, t)] = turn
                if ring == 0:
                    now = turn  # wait for the turn, then add
                    continue
                pending = [p for p in pending + [turn] if p > now]
                if len(pending) > ring:
                    pending.sort()
                    now = pending.pop(0)
                    pending = [p for p in pending if p > now]
            now = max([now, *pending])
            heapq.heappush(free, now)
            end = max(end, now)
    return end / (work / slots)


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
                      "last slots first": sorted(tiles, reverse=True)}
            row = {"N": n, "segment": seg, "reads": args.reads, "ratio": {}}
            for name, order in orders.items():
                for how in ("split", "inc", "dec"):
                    row["ratio"][f"{name}, {how}"] = simulate(tiles, order, how, slots=args.slots, heads=args.heads)
                for ring in (2, 8, 32):
                    row["ratio"][f"{name}, ring {ring}"] = simulate(tiles, order, "inc", slots=args.slots,
                                                                     heads=args.heads, ring=ring)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "slots": args.slots,
                                         "heads": args.heads, "cost": COST, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
