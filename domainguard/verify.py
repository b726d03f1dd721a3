"""Flow verification on the layered graph of DESIGN §2.

Nodes are (domain, level) for levels 0..L. Layer l adds (S, l) → (R, l+1) when R may
read S at layer l, and the residual edge (R, l) → (R, l+1). Decoding adds the feedback
edge (g, L) → (g, 0) for the generation domain g. ``flow A → B`` is violated when
(A, 0) reaches some (B, l); ``combine [A, B]`` when some node is reached from both.

Reachability for the verdict is exact boolean linear algebra over the relation
tables; witnesses are fewest-hop paths found by dynamic programming over levels;
the unbounded-depth check (any depth, any number of decode steps) runs on a compact
networkx graph built from the reads entries themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import networkx as nx
import numpy as np
from .policy import ForbidCombine, ForbidFlow, ForbidIsolate
from .verdict import Path, Result, Status, Step, Verdict, combine_status

_INF = np.iinfo(np.int32).max // 4


# --- reachability ------------------------------------------------------------------------
def _propagate(flow, start: np.ndarray) -> np.ndarray:
    """One forward pass: start float32 [D, K] (node × source, 0/1) at level 0 → reach at level L."""
    R = start.copy()
    rel = flow.__dict__.get("_rel_f32")
    if rel is None:
        rel = flow.__dict__["_rel_f32"] = flow.relations.astype(np.float32)
    L = flow.num_layers
    l = 0
    while l < L:
        nxt = ((R + rel[l] @ R) > 0).astype(np.float32)
        if np.array_equal(nxt, R):
            # INVARIANT: a fixed point under layer l stays fixed for every following layer with the same relation.
            cid = flow.layer_config[l]
            while l < L and flow.layer_config[l] == cid:
                l += 1
            continue
        R = nxt
        l += 1
    return R


def _feedback_fixpoint(flow, sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(at layer 0, after a forward pass), each bool [D, K]: domain n holds information of source k,
    decode feedback included."""
    D = len(flow.tree.names)
    cols = np.arange(D) if sources is None else np.asarray(sources)
    start = np.zeros((D, len(cols)), dtype=np.float32)
    start[cols, np.arange(len(cols))] = 1.0
    R = _propagate(flow, start)
    g = flow.generation
    while g is not None:
        # A generated token restarts at layer 0 carrying what (g, L) held.
        merged = ((start[g] + R[g]) > 0).astype(np.float32)
        if np.array_equal(merged, start[g]):
            break
        start[g] = merged
        R = _propagate(flow, start)
    return start > 0, R > 0


def reach_table(flow, sources: np.ndarray | None = None) -> np.ndarray:
    """bool [D, K]: node domain n holds information of source k after a forward pass, decode feedback included."""
    return _feedback_fixpoint(flow, sources)[1]


def entry_table(flow) -> np.ndarray:
    """bool [D, D]: [n, s] when a token of domain n may hold information of domain s already at layer 0.

    That is n itself, and for the generation domain everything the model's last layer holds there
    (a generated token re-enters carrying it). ``positions: reach`` counts exactly these domains,
    so a position id carries nothing the verifier has not already let reach the token at layer 0.
    Without a fixed depth, the any-depth closure stands in for the last layer.
    """
    if flow.depth_given:
        return _feedback_fixpoint(flow)[0]
    table = np.eye(len(flow.tree.names), dtype=bool)
    if flow.generation is not None:
        table[flow.generation] |= closure(flow)[flow.generation]
    return table


def closure(flow) -> np.ndarray:
    """bool [D, D]: [n, s] when s reaches n through any number of layers and decode steps."""
    D = len(flow.tree.names)
    C = ((flow.union.astype(np.float32) + np.eye(D, dtype=np.float32)) > 0).astype(np.float32)
    while True:
        nxt = ((C @ C) > 0).astype(np.float32)
        if np.array_equal(nxt, C):
            return C > 0
        C = nxt


# --- fewest-hop witnesses ---------------------------------------------------------------
@dataclass
class _Pass:
    dist: np.ndarray  # int32 [L+1, D]
    choice: np.ndarray  # int32 [L+1, D]: -1 stay/origin, -2 decode feedback (level 0), >=0 attended source


def _hop_passes(flow, start: np.ndarray, targets: np.ndarray | None = None, stop_at: int | None = None) -> list[_Pass]:
    """Fewest cross-domain hops to every (domain, level), pass by pass through decode feedback.

    With ``targets``, stops at the first level where one is reached (later levels copy it):
    witnesses are then shortest in layers first, hops second.
    """
    D, L, g = len(flow.tree.names), flow.num_layers, flow.generation
    dist0 = np.where(start, 0, _INF).astype(np.int32)
    choice0 = np.full(D, -1, dtype=np.int32)
    passes: list[_Pass] = []
    rows = np.arange(D)
    while True:
        dist = np.empty((L + 1, D), dtype=np.int32)
        choice = np.full((L + 1, D), -1, dtype=np.int32)
        dist[0], choice[0] = dist0, choice0
        for l in range(L):
            if (targets is not None and (dist[l, targets] < _INF).any()) or (stop_at is not None and l >= stop_at):
                dist[l + 1:] = dist[l]
                passes.append(_Pass(dist, choice))
                return passes
            active = np.flatnonzero(dist[l] < _INF)  # only reached nodes can pass anything on
            cand = np.where(flow.relations[l][:, active], dist[l, active][None, :] + 1, _INF)
            best_j = cand.argmin(axis=1)
            best = cand[rows, best_j]
            take = best < dist[l]
            dist[l + 1] = np.where(take, best, dist[l])
            choice[l + 1] = np.where(take, active[best_j], -1)
        passes.append(_Pass(dist, choice))
        if g is None or dist[L, g] + 1 >= dist0[g] or len(passes) > D + 1:
            return passes
        dist0, choice0 = dist0.copy(), choice0.copy()
        dist0[g], choice0[g] = dist[L, g] + 1, -2


def _path_to(flow, passes: list[_Pass], node: int, level: int) -> Path:
    names, L = flow.tree.names, flow.num_layers
    p = len(passes) - 1
    steps: list[Step] = []
    n, l = node, level
    while True:
        ps = passes[p]
        if l > 0:
            c = int(ps.choice[l, n])
            if c >= 0:
                steps.append(Step(names[n], l, "attention"))
                n = c
            l -= 1
            continue
        c = int(ps.choice[0, n])
        if c == -2:
            steps.append(Step(names[n], 0, "decode"))
            p, l = p - 1, L
            continue
        steps.append(Step(names[n], 0, "origin"))
        break
    return Path(tuple(reversed(steps)))


def _earliest(passes: list[_Pass], targets: np.ndarray) -> tuple[int, int] | None:
    """(node, level) among ``targets`` with fewest hops, earliest level first."""
    dist = passes[-1].dist[:, targets]  # [L+1, T]
    best = dist.min()
    if best >= _INF:
        return None
    levels, cols = np.nonzero(dist == best)
    i = int(np.argmin(levels))
    return int(targets[cols[i]]), int(levels[i])


# --- unbounded depth: compact networkx graph over reads entries -------------------------
def _entry_graph(flow) -> nx.DiGraph:
    """Paths between ("d", i) nodes = information paths at any depth (O(D + entries) edges); built once per flow."""
    cached = flow.__dict__.get("_entry_graph")
    if cached is not None:
        return cached
    G = nx.DiGraph()
    tree = flow.tree
    for i, parent in enumerate(tree.parents):
        G.add_edge(("d", i), ("out", i))
        G.add_edge(("in", i), ("d", i))
        if parent >= 0:
            G.add_edge(("out", i), ("out", parent))
            G.add_edge(("in", parent), ("in", i))
    for atom in flow.atoms:
        G.add_edge(("out", atom.source), ("in", atom.reader), origin=atom.origin_text)
    flow.__dict__["_entry_graph"] = G
    return G


def _unbounded_path(flow, G: nx.DiGraph, sources, targets) -> Path | None:
    G.add_edges_from((("src",), ("d", int(s))) for s in sources)
    G.add_edges_from((("d", int(t)), ("dst",)) for t in targets)
    try:
        nodes = nx.shortest_path(G, ("src",), ("dst",))
    except nx.NetworkXNoPath:
        return None
    finally:
        G.remove_nodes_from([("src",), ("dst",)])
    doms = [n[1] for n in nodes if n[0] == "d"]
    names = flow.tree.names
    return Path(tuple(Step(names[d], i, "origin" if i == 0 else "attention") for i, d in enumerate(doms)))


# --- claims -----------------------------------------------------------------------------
def _rule_parts(flow, rule) -> tuple[str, list[tuple[str, str]]]:
    if isinstance(rule, ForbidFlow):
        return "flow", [(rule.flow.from_, rule.flow.to)]
    if isinstance(rule, ForbidIsolate):
        a, b = rule.isolate
        return "isolate", [(a, b), (b, a)]
    a, b = rule.combine
    return "combine", [(a, b)]


def _subtree_ids(flow, name: str) -> np.ndarray:
    r = flow.tree.subtree(flow.tree.index[name])
    return np.arange(r.start, r.stop)


def prove_no_flow(flow, src: str, dst: str, reach: np.ndarray, unbounded: np.ndarray) -> tuple[Status, list[Path], Status, Path | None]:
    """PROVED iff no (s, 0) with s in subtree(src) reaches any (d, l) with d in subtree(dst) in the
    layered graph (decode feedback included); also returns the unbounded-depth status and witness."""
    S, T = _subtree_ids(flow, src), _subtree_ids(flow, dst)
    at_depth = reach[np.ix_(T, S)].any()
    any_depth = unbounded[np.ix_(T, S)].any()
    witness: list[Path] = []
    if at_depth:
        start = np.zeros(len(flow.tree.names), dtype=bool)
        start[S] = True
        passes = _hop_passes(flow, start, T)
        hit = _earliest(passes, T)
        assert hit is not None, f"reach table says {src}->{dst} leaks but the hop search found no path"
        witness.append(_path_to(flow, passes, *hit))
    ub_path = _unbounded_path(flow, _entry_graph(flow), S, T) if any_depth else None
    return (Status.REFUTED if at_depth else Status.PROVED), witness, (Status.REFUTED if any_depth else Status.PROVED), ub_path


def prove_no_combine(flow, a: str, b: str, reach: np.ndarray, unbounded: np.ndarray) -> tuple[Status, list[Path], Status, Path | None]:
    """PROVED iff no node (n, l) has both some (a', 0), a' in subtree(a), and some (b', 0), b' in subtree(b), as ancestors."""
    A, B = _subtree_ids(flow, a), _subtree_ids(flow, b)
    mix = reach[:, A].any(axis=1) & reach[:, B].any(axis=1)
    mix_any = unbounded[:, A].any(axis=1) & unbounded[:, B].any(axis=1)
    witness: list[Path] = []
    if mix.any():
        D = len(flow.tree.names)
        sa, sb = np.zeros(D, dtype=bool), np.zeros(D, dtype=bool)
        sa[A], sb[B] = True, True
        # Earliest level of the first pass where some node holds both (cheap level-wise vectors).
        stop_at, fa, fb = None, sa.astype(np.float32), sb.astype(np.float32)
        for l in range(flow.num_layers + 1):
            if (fa > 0).__and__(fb > 0).any():
                stop_at = l
                break
            if l < flow.num_layers:
                rel = flow.relations[l]
                fa = ((fa + rel @ fa) > 0).astype(np.float32)
                fb = ((fb + rel @ fb) > 0).astype(np.float32)
        pa, pb = _hop_passes(flow, sa, stop_at=stop_at), _hop_passes(flow, sb, stop_at=stop_at)
        total = pa[-1].dist.astype(np.int64) + pb[-1].dist.astype(np.int64)
        total[(pa[-1].dist >= _INF) | (pb[-1].dist >= _INF)] = np.iinfo(np.int64).max
        level, node = np.unravel_index(int(np.argmin(total)), total.shape)
        witness = [_path_to(flow, pa, int(node), int(level)), _path_to(flow, pb, int(node), int(level))]
    ub: Path | None = None
    if mix_any.any():
        G = _entry_graph(flow)
        n = int(np.flatnonzero(mix_any)[0])
        ub = _unbounded_path(flow, G, A, [n])
    return (Status.REFUTED if mix.any() else Status.PROVED), witness, (Status.REFUTED if mix_any.any() else Status.PROVED), ub


def _statement(kind: str, a: str, b: str) -> str:
    return {
        "flow": f"no information path from {a} to {b}",
        "isolate": f"no information path between {a} and {b}, in either direction",
        "combine": f"no hidden state depends on both {a} and {b}",
    }[kind]


def check_rules(compiled, reach: np.ndarray, unbounded: np.ndarray, rules=None) -> list[Result]:
    """One Result per forbid rule (or per (id, rule) in ``rules``), by graph search."""
    from .parse import locate

    flow, policy = compiled.flow, compiled.policy
    scope = {
        "layers": flow.num_layers if flow.depth_given else "any",
        "profile": flow.profile,
        "decode_steps": "any" if flow.generation is not None else 0,
    }
    out = []
    todo = rules if rules is not None else [(f"forbid[{i}]", r) for i, r in enumerate(policy.forbid)]
    for rule_id, rule in todo:
        t0 = time.perf_counter()
        kind, pairs = _rule_parts(flow, rule)
        statuses, witness, ub_statuses, ub_paths = [], [], [], []
        for a, b in pairs:
            fn = prove_no_combine if kind == "combine" else prove_no_flow
            st, wit, ub_st, ub_path = fn(flow, a, b, reach, unbounded)
            statuses.append(st)
            witness += wit
            ub_statuses.append(ub_st)
            if ub_path is not None:
                ub_paths.append(ub_path)
        at_depth, any_depth = combine_status(statuses), combine_status(ub_statuses)
        if not flow.depth_given:
            status, witness_final = any_depth, tuple(ub_paths) if any_depth is Status.REFUTED else ()
        else:
            status, witness_final = at_depth, tuple(witness)
        loc = locate(policy, ("forbid", int(rule_id[7:-1]))) if rule_id.startswith("forbid[") else None
        details = {
            "rule": rule.model_dump(mode="json", by_alias=True, exclude_none=True),
            "at_depth": at_depth.value if flow.depth_given else None,
            "unbounded": {"status": any_depth.value, "witness": [p.to_dict() for p in ub_paths]},
        }
        if loc is not None:
            details["location"] = {"file": loc.file, "line": loc.line, "column": loc.column}
        a, b = pairs[0]
        out.append(
            Result(
                id=rule_id,
                kind=kind,
                statement=_statement(kind, a, b),
                status=status,
                method={
                    "name": "graph-search",
                    "engine": f"layered boolean reachability (numpy {np.__version__}); networkx {nx.__version__} for any depth",
                    "seconds": round(time.perf_counter() - t0, 6),
                },
                scope=scope,
                witness=witness_final,
                details=details,
            )
        )
    return out


def reach_report(flow, reach: np.ndarray) -> dict[str, list[str]]:
    """For each domain, the sources whose information reaches it (at the model's depth)."""
    names = flow.tree.names
    return {names[n]: [names[s] for s in np.flatnonzero(reach[n]) if s != n] for n in range(len(names))}


# Up to this many domains, rules without a depth are decided exactly on a stand-in depth (below); beyond
# it, by the order-free closure of every layer's relation, which can only err towards REFUTED.
EXACT_ANY_DEPTH_DOMAINS = 256


def any_depth_stand_in(compiled):
    """For a policy verified without a depth: the same policy at a depth that stands for every depth.

    That is the layers its overrides name, then one base layer per domain. Reach only grows with depth
    (the residual edge keeps what a token holds), and past the overrides every layer is the same base
    relation, along which any path needs fewer hops than there are domains; so a path exists at some
    depth exactly when one exists at this one (decode feedback included). None when a depth was
    given, or above ``EXACT_ANY_DEPTH_DOMAINS`` domains."""
    from .compiled import CompiledPolicy
    from .flow import resolve

    from .flow import MAX_LAYERS

    flow = compiled.flow
    D = len(flow.tree.names)
    if flow.depth_given or D > EXACT_ANY_DEPTH_DOMAINS or flow.num_layers - 1 + D > MAX_LAYERS:
        return None
    deep = resolve(compiled.policy, num_layers=flow.num_layers - 1 + D, profile=flow.profile, source=compiled.source)
    return CompiledPolicy(policy=compiled.policy, flow=deep, source=compiled.source)


def _explainer(compiled, stand_in):
    """What Z3 explains a refuted rule on: the stand-in depth, or, where that is too large to explain, the
    depth-free encoding (a leak there includes the layered one, so the entries it names still restore it)."""
    from .solver import _MAX_EXPLAIN_CELLS

    if stand_in is None:
        return compiled
    f = stand_in.flow
    return stand_in if len(f.tree.names) * (f.num_layers + 1) * max(1, len(f.atoms)) <= _MAX_EXPLAIN_CELLS else compiled


def _as_any_depth(result: Result, stand_in) -> Result:
    import dataclasses

    details = {**result.details, "at_depth": None,
               "any_depth": {"method": "layered search at a stand-in depth", "layers": stand_in.num_layers}}
    return dataclasses.replace(result, scope={**result.scope, "layers": "any"}, details=details)


def verify(compiled, *, explain: bool = True, suggest: bool = False, timeout_ms: int = 20_000) -> Verdict:
    """Check every forbid rule and profile; PROVED only if every claim is PROVED."""
    from . import solver

    flow = compiled.flow
    stand_in = any_depth_stand_in(compiled)
    basis = stand_in or compiled  # what the rules are searched on
    reach = reach_table(basis.flow)
    unbounded = closure(flow)
    results = check_rules(basis, reach, unbounded)
    if stand_in is not None:
        results = [_as_any_depth(r, stand_in) for r in results]
    findings: list[dict] = []
    for r in results:
        if flow.depth_given and r.status is Status.PROVED and r.details["unbounded"]["status"] == "REFUTED":
            findings.append({
                "code": "DGF02", "severity": "warning",
                "message": f"{r.id} ({r.statement}) holds at {flow.num_layers} layers but not for a deeper model",
            })
    if explain:
        by = _explainer(compiled, stand_in)
        results = [solver.explain(by, r, timeout_ms=timeout_ms) if r.status is Status.REFUTED else r for r in results]
    results += solver.prove_profiles(compiled, timeout_ms=timeout_ms)
    if compiled.policy.positions == "global" and compiled.policy.forbid:
        findings.append({
            "code": "DGF01", "severity": "warning",
            "message": "positions are global: a protected token can learn the length of an earlier forbidden "
                       "segment from its position id; set `positions: reach` (or `per_domain`) to close this channel",
        })
    findings += index_pattern_findings(compiled, reach)
    suggestion = solver.suggest(compiled, timeout_ms=timeout_ms) if suggest else None
    status = combine_status(r.status for r in results) if results else Status.PROVED
    return Verdict(status, tuple(results), reach_report(basis.flow, reach), tuple(findings), suggestion)


INDEX_PATTERN_FIELDS = ("window", "dilation", "stride", "block_local", "random")


def index_pattern_findings(compiled, reach: np.ndarray) -> list[dict]:
    """DGF03: a domain whose pattern measures distance in sequence index (window, dilation, stride,
    block-local, random links) while it may not read some domain. The index counts every token of
    the row, so the length of a forbidden segment before its tokens moves the window (or blocks,
    strides, links) over the tokens it may read: which of them it reads can depend on that length,
    whatever ``positions`` says."""
    from .policy import parse_layer_range

    flow, names = compiled.flow, compiled.flow.tree.names
    L = flow.num_layers
    heads, layers = {0}, {0}
    for value in compiled.policy.patterns.values():
        for pat in value if isinstance(value, list) else [value]:
            # Patterns are constant between the ends of these ranges: one layer and head each side stands for all.
            if pat.heads is not None:
                rng = parse_layer_range(pat.heads, 1 << 30)
                heads |= {rng.start, rng.stop}
            if pat.layers is not None:
                try:
                    rng = parse_layer_range(pat.layers, L)
                except ValueError:
                    continue  # beyond the layers of a policy compiled without a depth
                layers |= {x for x in (rng.start, rng.stop) if x < L}
    out = []
    for d in range(len(names)):
        forbidden = [names[x] for x in range(len(names)) if not reach[d, x]]
        if not forbidden:
            continue
        kinds = sorted({f for layer in layers for h in heads
                        for pat in [compiled.pattern(d, layer, h)] if pat is not None
                        for f in INDEX_PATTERN_FIELDS if getattr(pat, f) is not None})
        if kinds:
            shown = ", ".join(forbidden[:4]) + (", …" if len(forbidden) > 4 else "")
            out.append({
                "code": "DGF03", "severity": "warning",
                "message": f"the pattern of {names[d]!r} ({', '.join(kinds)}) measures distance in sequence index, "
                           f"which counts tokens of domains it may not read ({shown}): the length of such a segment "
                           f"placed before {names[d]!r} can change which tokens it reads",
            })
    return out


def explain_flow(compiled, src: str, dst: str, *, timeout_ms: int = 20_000) -> Result:
    """Is there an information path from ``src`` to ``dst``? With the witness and, if so, the Z3 explanation."""
    from . import solver
    from .policy import Flow

    for name in (src, dst):
        compiled.id_of(name)
    rule = ForbidFlow(flow=Flow.model_validate({"from": src, "to": dst}))
    stand_in = any_depth_stand_in(compiled)
    basis = stand_in or compiled
    result = check_rules(basis, reach_table(basis.flow), closure(compiled.flow), rules=[("query", rule)])[0]
    if stand_in is not None:
        result = _as_any_depth(result, stand_in)
    if result.status is Status.REFUTED:
        result = solver.explain(_explainer(compiled, stand_in), result, timeout_ms=timeout_ms, rule=rule)
    return result
