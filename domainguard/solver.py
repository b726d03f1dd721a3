"""Z3 where it adds power beyond graph search.

* ``prove_profile_refines``: every pair a profile allows, the base allows, at every
  layer — proved over the reads entries themselves (subtrees are id intervals), not
  over an enumerated table; each widened pair is named.
* ``explain``: for a refuted rule, the reads entries the leak relies on (an unsat
  core) and which single entries, if dropped, restore the rule.
* ``suggest``: a maximal set of reads entries under which every forbid rule holds (MaxSAT).

Every ``check()`` goes through ``check``, which records ``reason_unknown()``;
nothing treats UNKNOWN as PROVED.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import z3

from .verdict import Result, Status
from .verify import _rule_parts, _subtree_ids

Z3_VERSION = z3.get_version_string()


def check(s: z3.Solver | z3.Optimize, *assumptions) -> tuple[Status | str, str | None]:
    """Run ``s.check``; return "sat"/"unsat" or (UNKNOWN, reason). Never turns unknown into an answer."""
    r = s.check(*assumptions)
    if r == z3.sat:
        return "sat", None
    if r == z3.unsat:
        return "unsat", None
    return Status.UNKNOWN, s.reason_unknown() or "unknown"


def _method(t0: float) -> dict:
    return {"name": "z3", "version": Z3_VERSION, "seconds": round(time.perf_counter() - t0, 6)}


def _intervals(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [lo, hi) of True in a bool vector."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _in(x, lo: int, hi: int):
    return z3.And(x >= lo, x < hi) if hi - lo > 1 else x == lo


def _allowed(flow, l, r, s):
    """Z3 formula: at layer l, reader r may attend source s (from reads entries and the diagonal)."""
    tree = flow.tree
    terms = []
    for atom in flow.atoms:
        lay = np.zeros(flow.num_layers, dtype=bool)
        lay[list(atom.layers)] = True
        rr, ss = tree.subtree(atom.reader), tree.subtree(atom.source)
        terms.append(z3.And(z3.Or([_in(l, a, b) for a, b in _intervals(lay)]),
                            _in(r, rr.start, rr.stop), _in(s, ss.start, ss.stop)))
    diag = np.stack([np.diagonal(flow.relations[x]) for x in range(flow.num_layers)])  # [L, D]
    diag_terms = []
    for x in sorted(set(flow.layer_config)):
        layers = np.array([c == x for c in flow.layer_config])
        keep = diag[layers.argmax()]
        for lo, hi in _intervals(keep):
            diag_terms.append(z3.And(z3.Or([_in(l, a, b) for a, b in _intervals(layers)]), _in(r, lo, hi)))
    terms.append(z3.And(r == s, z3.Or(diag_terms) if diag_terms else z3.BoolVal(False)))
    return z3.Or(terms)


def prove_profile_refines(compiled, profile: str, timeout_ms: int = 20_000, max_pairs: int = 64) -> Result:
    """PROVED iff for every layer l and domains r, s: profile allows (r, s) at l ⇒ base allows (r, s) at l.

    REFUTED names every widened (reader, source) pair with the layers where it is widened.
    """
    from .flow import resolve

    t0 = time.perf_counter()
    policy, L = compiled.policy, compiled.num_layers
    base = resolve(policy, num_layers=L)
    prof = resolve(policy, num_layers=L, profile=profile)
    D = len(base.tree.names)
    l, r, s = z3.Ints("layer reader source")
    solver = z3.Solver()
    solver.set("timeout", timeout_ms)
    solver.add(l >= 0, l < L, r >= 0, r < D, s >= 0, s < D)
    solver.add(_allowed(prof, l, r, s), z3.Not(_allowed(base, l, r, s)))
    names = base.tree.names
    widened: list[dict] = []
    status: Status | None = None
    reason = None
    while True:
        res, why = check(solver)
        if res == "unsat":
            status = Status.REFUTED if widened else Status.PROVED
            break
        if res != "sat":
            status, reason = Status.UNKNOWN, f"z3: {why}"
            break
        m = solver.model()
        rv, sv = m.eval(r).as_long(), m.eval(s).as_long()
        layers = [x for x in range(L) if prof.relations[x, rv, sv] and not base.relations[x, rv, sv]]
        # INVARIANT: the symbolic encoding and the tables agree; a model the tables deny is a bug here.
        assert layers, f"z3 found widened pair ({names[rv]}, {names[sv]}) but the tables show none"
        widened.append({"reader": names[rv], "source": names[sv], "layers": layers})
        if len(widened) >= max_pairs:
            status, reason = Status.REFUTED, f"stopped after {max_pairs} widened pairs"
            break
        solver.add(z3.Not(z3.And(r == rv, s == sv)))
    # Cross-check against the concrete tables: a disagreement is never PROVED.
    table_widens = bool((prof.relations & ~base.relations).any())
    if status is Status.PROVED and table_widens:
        status, reason = Status.UNKNOWN, "symbolic proof and concrete tables disagree"
    from .parse import locate

    loc = locate(policy, ("profiles", profile), key=True)
    details = {"widened": widened}
    if loc is not None:
        details["location"] = {"file": loc.file, "line": loc.line, "column": loc.column}
    text = "; ".join(f"{w['reader']} ← {w['source']} ({_layers_text(w['layers'], L, compiled.flow.depth_given)})"
                     for w in widened)
    return Result(
        id=f"profile[{profile}]",
        kind="profile-refines",
        statement=f"profile {profile!r} only tightens the base policy (every pair it allows, the base allows)",
        status=status,
        method=_method(t0),
        scope={"layers": L, "profile": profile},
        reason=reason or (f"widens: {text}" if widened else None),
        details=details,
    )


def _layers_text(layers: list[int], num_layers: int, depth_given: bool) -> str:
    """``every layer`` when all of the tables' layers are named; else ``layers 2-3``, with ``and deeper`` when no
    depth was given and the tables' last layer is named (it stands for every layer below it in the model)."""
    if len(layers) == num_layers:
        return "every layer"
    deeper = " and deeper" if not depth_given and num_layers - 1 in layers else ""
    return f"layers {_ranges(layers)}{deeper}"


def _ranges(layers: list[int]) -> str:
    mask = np.zeros(max(layers) + 1, dtype=bool)
    mask[layers] = True
    return ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in _intervals(mask))


def prove_profiles(compiled, timeout_ms: int = 20_000) -> list[Result]:
    """Refinement claims: for the compiled profile only, or for every profile when none is selected."""
    names = [compiled.profile] if compiled.profile else list(compiled.policy.profiles)
    return [prove_profile_refines(compiled, p, timeout_ms) for p in names]


# --- reachability as SAT, with one literal per reads entry -------------------------------
def _leak_encoding(flow, sources: np.ndarray, targets: np.ndarray, enabled: dict, tag: str):
    """Constraints whose models are exactly the states where no path sources→targets exists
    using only enabled entries. ``enabled``: entry origin → z3 Bool.

    With a depth, nodes are (domain, level) as in the layered graph; without one (any depth),
    nodes are domains and every entry's edges apply at once.
    """
    D, g = len(flow.tree.names), flow.generation
    L = flow.num_layers if flow.depth_given else 0
    reach = [[z3.Bool(f"{tag}_r{d}_{x}") for d in range(D)] for x in range(L + 1)]
    cons = []
    tree = flow.tree
    cover: dict[tuple[int, int, int], list] = {}
    for atom in flow.atoms:
        lit = enabled[atom.origin]
        for x in (atom.layers if flow.depth_given else (0,)):
            for rd in tree.subtree(atom.reader):
                for sd in tree.subtree(atom.source):
                    if rd != sd:
                        cover.setdefault((x, rd, sd), []).append(lit)
    for x in range(L):
        for d in range(D):
            cons.append(z3.Implies(reach[x][d], reach[x + 1][d]))
    step = 1 if flow.depth_given else 0
    for (x, rd, sd), lits in cover.items():
        cons.append(z3.Implies(z3.And(reach[x][sd], z3.Or(lits)), reach[x + step][rd]))
    if g is not None and flow.depth_given:
        cons.append(z3.Implies(reach[L][g], reach[0][g]))
    cons += [reach[0][d] for d in sources]
    cons += [z3.Not(reach[x][d]) for x in range(L + 1) for d in targets]
    return cons


def _rule_encoding(flow, rule, enabled: dict, tag: str):
    kind, pairs = _rule_parts(flow, rule)
    if kind != "combine":
        return [c for j, (a, b) in enumerate(pairs)
                for c in _leak_encoding(flow, _subtree_ids(flow, a), _subtree_ids(flow, b), enabled, f"{tag}_{j}")]
    # combine: no node reached from both; encode reach from each side and forbid overlap.
    a, b = pairs[0]
    D, L = len(flow.tree.names), (flow.num_layers if flow.depth_given else 0)
    cons = _leak_encoding(flow, _subtree_ids(flow, a), np.array([], dtype=int), enabled, f"{tag}_a")
    cons += _leak_encoding(flow, _subtree_ids(flow, b), np.array([], dtype=int), enabled, f"{tag}_b")
    ra = lambda x, d: z3.Bool(f"{tag}_a_r{d}_{x}")  # noqa: E731
    rb = lambda x, d: z3.Bool(f"{tag}_b_r{d}_{x}")  # noqa: E731
    cons += [z3.Not(z3.And(ra(x, d), rb(x, d))) for x in range(L + 1) for d in range(D)]
    return cons


_MAX_EXPLAIN_CELLS = 400_000  # (domains × layers × entries) beyond which explanations are skipped, not guessed


def explain(compiled, result: Result, timeout_ms: int = 20_000, rule=None) -> Result:
    """Attach to a refuted rule the entries its leak relies on and the single entries whose removal restores it."""
    flow = compiled.flow
    t0 = time.perf_counter()
    if rule is None:
        rule = compiled.policy.forbid[int(result.id.split("[")[1].rstrip("]"))]
    size = len(flow.tree.names) * (flow.num_layers + 1) * max(1, len(flow.atoms))
    if size > _MAX_EXPLAIN_CELLS:
        exp = {"status": Status.UNKNOWN.value, "reason": f"policy too large for explanations ({size} cells)"}
        return dataclasses.replace(result, details={**result.details, "explanation": exp})
    enabled = {a.origin: z3.Bool("e:" + a.origin_text) for a in flow.atoms}
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.set("core.minimize", True)
    s.add(_rule_encoding(flow, rule, enabled, "x"))
    lits = list(enabled.values())
    res, why = check(s, *lits)
    if res != "unsat":
        # sat would mean the graph search and the encoding disagree: never hide that.
        reason = why if res is Status.UNKNOWN else "z3 found no leak although graph search did"
        exp = {"status": Status.UNKNOWN.value, "reason": reason}
        return dataclasses.replace(result, details={**result.details, "explanation": exp})
    core = {str(c) for c in s.unsat_core()}
    core_atoms = [a for a in flow.atoms if "e:" + a.origin_text in core]
    single = []
    for atom in core_atoms:
        others = [enabled[a.origin] for a in flow.atoms if a.origin != atom.origin]
        r2, _ = check(s, *others, z3.Not(enabled[atom.origin]))
        if r2 == "sat":
            single.append(atom.origin_text)
    exp = {
        "status": "PROVED",
        "method": _method(t0),
        "relies_on": [a.origin_text for a in core_atoms],
        "drop_one_of": single,
        "text": (f"drop one of: {', '.join(single)}" if single else
                 "no single entry restores the rule; drop several (see `--suggest`)"),
    }
    lines = {}
    from .parse import locate

    for a in core_atoms:
        loc = locate(compiled.policy, a.origin)
        if loc is not None:
            lines[a.origin_text] = loc.line
    exp["lines"] = lines
    return dataclasses.replace(result, details={**result.details, "explanation": exp})


def suggest(compiled, timeout_ms: int = 60_000) -> dict:
    """MaxSAT: keep as many reads entries as possible such that every forbid rule holds."""
    flow = compiled.flow
    t0 = time.perf_counter()
    size = len(flow.tree.names) * (flow.num_layers + 1) * max(1, len(flow.atoms)) * max(1, len(compiled.policy.forbid))
    if size > 4 * _MAX_EXPLAIN_CELLS:
        return {"status": Status.UNKNOWN.value, "reason": f"policy too large for --suggest ({size} cells)"}
    enabled = {a.origin: z3.Bool("e:" + a.origin_text) for a in flow.atoms}
    opt = z3.Optimize()
    opt.set("timeout", timeout_ms)
    for i, rule in enumerate(compiled.policy.forbid):
        opt.add(_rule_encoding(flow, rule, enabled, f"rule{i}"))
    for lit in enabled.values():
        opt.add_soft(lit, 1)
    res, why = check(opt)
    if res != "sat":
        return {"status": Status.UNKNOWN.value, "reason": f"z3: {why}" if why else "z3 found no assignment",
                "method": _method(t0)}
    m = opt.model()
    keep = [a.origin_text for a in flow.atoms if z3.is_true(m.eval(enabled[a.origin], model_completion=True))]
    drop = [a.origin_text for a in flow.atoms if a.origin_text not in keep]
    return {"status": "PROVED", "keep": keep, "drop": drop, "method": _method(t0),
            "text": f"drop {len(drop)} of {len(flow.atoms)} reads entries: {', '.join(drop) or 'none'}"}
