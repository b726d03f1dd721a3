"""Verifier scale benchmark: 1,000 domains, 5,000 reads entries, 64 layers.

    python benchmarks/verify.py [--domains 1000] [--reads 5000] [--layers 64] [--rules 20] [--seed 0]

Generates a random policy (a two-level tree of groups and leaves, reads entries
mostly between leaves, four per-layer overrides, flow/combine/isolate rules),
then times parse, compile and verify separately. Prints one table.
"""

from __future__ import annotations

import argparse
import random
import time

import yaml

import domainguard as dg


def make_policy(domains: int, reads: int, layers: int, rules: int, seed: int) -> str:
    rng = random.Random(seed)
    groups = max(1, domains // 20)
    names, tree = [], {}
    per = (domains - groups) // groups
    for g in range(groups):
        kids = {f"g{g}_d{i}": {} for i in range(per)}
        tree[f"g{g}"] = {"children": kids}
        names += list(kids)
    leftover = domains - groups - per * groups
    for i in range(leftover):
        tree[f"extra{i}"] = {}
        names.append(f"extra{i}")
    readers: dict[str, list[str]] = {}
    # Entries between leaves only, mostly within a group: realistic and keeps leaks local.
    while sum(len(v) for v in readers.values()) < reads:
        r = rng.choice(names)
        s = rng.choice(names)
        if s != r and s not in readers.get(r, []):
            readers.setdefault(r, []).append(s)
    overrides = []
    for k in range(4):
        lo = rng.randrange(layers - 8)
        some = rng.sample(sorted(readers), 10)
        overrides.append({"layers": f"{lo}-{lo + 7}" if k % 2 == 0 else f"{lo + 1}",
                          "reads": {r: readers[r][:1] for r in some}})
    # Make layer ranges for the same reader disjoint: drop later duplicates.
    seen: dict[str, set[int]] = {}
    for ov in overrides:
        a, _, b = ov["layers"].partition("-")
        span = set(range(int(a), int(b or a) + 1))
        for r in list(ov["reads"]):
            if seen.get(r, set()) & span:
                del ov["reads"][r]
            else:
                seen.setdefault(r, set()).update(span)
    forbid = []
    for i in range(rules):
        a, b = rng.sample(names, 2)
        forbid.append([{"flow": {"from": a, "to": b}}, {"combine": [a, b]}, {"isolate": [a, b]}][i % 3])
    doc = {"domainguard": 1, "name": "scale", "domains": tree, "reads": readers, "layers": overrides,
           "forbid": forbid, "generation": {"domain": names[-1]}, "positions": "per_domain"}
    return yaml.safe_dump(doc, sort_keys=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--rules", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    text = make_policy(args.domains, args.reads, args.layers, args.rules, args.seed)
    t0 = time.perf_counter()
    policy = dg.loads_policy(text, "scale.yaml")
    t1 = time.perf_counter()
    compiled = dg.compile(policy, layers=args.layers)
    t2 = time.perf_counter()
    verdict = dg.verify(compiled)
    t3 = time.perf_counter()
    counts = {s: sum(r.status.value == s for r in verdict.results) for s in ("PROVED", "REFUTED", "UNKNOWN")}
    print(f"domains={compiled.num_domains} reads_entries={args.reads} layers={args.layers} rules={len(policy.forbid)}")
    print(f"verdicts: {counts}  overall: {verdict.status.value}")
    print(f"| parse | compile | verify | total |\n|---|---|---|---|\n"
          f"| {t1 - t0:.2f} s | {t2 - t1:.2f} s | {t3 - t2:.2f} s | {t3 - t0:.2f} s |")


if __name__ == "__main__":
    main()
