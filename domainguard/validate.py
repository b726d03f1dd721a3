"""Translation validation of the compiled tile tables (DESIGN §4).

Every check returns a certificate claim (a dict shaped like ``certificate.Claim``: id, kind,
statement, scope, method{name, version, seconds}, status, witness, reason, details):

* ``check_blockmap`` — exhaustive: re-derives every tile of one concrete BlockMap from the
  dense reference mask (patterns.token_mask) and compares. Scope: that layout.
* ``prove_tiles_sound`` / ``prove_decode_alignment`` — Z3, over every layout of at most
  ``max_len`` tokens in at most ``max_segments`` segments, tile size fixed per proof.
* ``prove_tile_rules_sound`` — Z3, over every per-tile summary: any token order, any length.
* ``prove_patterns_within_policy`` — Z3, per token pair: no pattern widens the relation.
* ``validation_claims`` — all of the above for a certificate.

A counterexample from the layout proofs replays on real tensors with ``replay_witness``.
UNKNOWN (timeout, unsupported) is reported as UNKNOWN, never as PROVED.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import z3

from .blockmap import _BIG as _ZBIG  # the builder's sentinel, so absent spans mean the same here
from .blockmap import EMPTY, FULL, PARTIAL, BlockMap
from .errors import LayoutError
from .layout import TokenAttrs
from .patterns import Span, group_domains, pair_mask, representative_heads, rules_for, token_mask
from .solver import check as _solver_check  # the one helper around every solver.check()
from .verdict import Status, combine_status

EXHAUSTIVE_VERSION = "1"


# --- exhaustive checker ----------------------------------------------------------------------


def tile_truth(mask: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a dense mask [B, Nq, Nk]: (some pair allowed, every existing pair allowed), each [B, Tq, Tk]."""
    b, nq, nk = mask.shape
    tq, tk = max(1, -(-nq // block_q)), max(1, -(-nk // block_k))
    padded = torch.zeros(b, tq * block_q, tk * block_k, dtype=torch.bool, device=mask.device)
    exists = torch.zeros_like(padded)
    padded[:, :nq, :nk] = mask
    exists[:, :nq, :nk] = True
    padded = padded.view(b, tq, block_q, tk, block_k)
    exists = exists.view(b, tq, block_q, tk, block_k)
    return padded.any(4).any(2), (padded | ~exists).all(4).all(2)


def _first_pair(bad: torch.Tensor, want: bool, mask_tile: torch.Tensor) -> tuple[int, int]:
    hit = (mask_tile == want).nonzero()
    return int(hit[0, 0]), int(hit[0, 1])


def check_kinds(kinds: torch.Tensor, mask: torch.Tensor, block_q: int, block_k: int) -> dict:
    """Compare one head's kinds [B, Tq, Tk] with a dense mask [B, Nq, Nk]: violations and precision."""
    any_, all_ = tile_truth(mask, block_q, block_k)
    full_bad = (kinds == FULL) & ~all_
    empty_bad = (kinds == EMPTY) & any_
    loose = (kinds == PARTIAL) & (all_ | ~any_)  # sound but could have been EMPTY/FULL
    witness = None
    for bad, kind, want in ((full_bad, "FULL", False), (empty_bad, "EMPTY", True)):
        if bool(bad.any()):
            b, tq, tk = (int(x) for x in bad.nonzero()[0])
            tile = mask[b, tq * block_q : (tq + 1) * block_q, tk * block_k : (tk + 1) * block_k]
            i, j = _first_pair(bad, want, tile)
            witness = {
                "batch": b,
                "tile": [tq, tk],
                "kind": kind,
                "query": tq * block_q + i,
                "key": tk * block_k + j,
                "pair_allowed": want,
            }
            break
    return {
        "full_violations": int(full_bad.sum()),
        "empty_violations": int(empty_bad.sum()),
        "loose_tiles": int(loose.sum()),
        "tiles": int(kinds.numel()),
        "witness": witness,
    }


def check_blockmap(blockmap: BlockMap, compiled, *, q_attrs=None, k_attrs=None) -> dict:
    """Claim: every FULL tile of ``blockmap`` holds only allowed pairs and every EMPTY tile none.

    PROVED means: for this concrete BlockMap and the tokens it was built over, comparing every
    tile against the dense reference mask (patterns.token_mask, O(Nq·Nk)) found no violation.
    ``q_attrs``/``k_attrs`` default to the tokens the map was built from.
    """
    t0 = time.perf_counter()
    q = blockmap._q if q_attrs is None else q_attrs
    k = blockmap._k if k_attrs is None else k_attrs
    relation = compiled.relation(blockmap.layer)
    heads = blockmap.heads if blockmap.heads is not None else (0,)
    totals = {"full_violations": 0, "empty_violations": 0, "loose_tiles": 0, "tiles": 0}
    witness = None
    for row, head in enumerate(heads):
        # The reference uses the policy's rules, never the rules the map was built with.
        mask = token_mask(q, k, relation, rules_for(compiled, blockmap.layer, head))
        res = check_kinds(blockmap.kinds[:, row], mask, blockmap.block_q, blockmap.block_k)
        for key in totals:
            totals[key] += res[key]
        if witness is None and res["witness"] is not None:
            witness = {"head": head, **res["witness"]}
    bad = totals["full_violations"] + totals["empty_violations"]
    claim = {
        "id": f"tables-exhaustive[layer={blockmap.layer}]",
        "kind": "tables-exhaustive",
        "statement": "every FULL tile holds no forbidden pair and every EMPTY tile no allowed pair "
        "(each tile re-derived from the dense reference mask)",
        "scope": {
            "layer": blockmap.layer,
            "heads": list(heads),
            "block_size": [blockmap.block_q, blockmap.block_k],
            "q_len": blockmap.q_len,
            "kv_len": blockmap.kv_len,
            "batch": int(blockmap.kinds.shape[0]),
            "layouts": "this concrete layout only",
        },
        "method": {"name": "exhaustive", "version": EXHAUSTIVE_VERSION, "seconds": round(time.perf_counter() - t0, 6)},
        "status": "REFUTED" if bad else "PROVED",
        "witness": [witness] if witness else None,
        "reason": None,
        "details": totals,
    }
    return claim


# --- Z3 ----------------------------------------------------------------------------------------
#
# The tile rules and the pair predicate are the very functions the torch paths run
# (patterns.MaskRule.tile_any / tile_all / mask, patterns.pair_mask), evaluated here on Z3
# terms through ``Z3Ops``. Layouts are symbolic: at most ``max_segments`` segments with
# symbolic boundaries and domains (trailing segments may be padding, empty segments allowed),
# total length N <= ``max_len``; query/key tile indices, and the witness pair inside them, are
# symbolic too. Only the tile size is fixed per proof (tile arithmetic stays linear).
# prove_tile_rules_sound drops the layout: tile summaries are free variables, so it holds for
# tiles over tokens in any order (the kernel's domain-sorted tiles) and of any length.

Z3_VERSION = z3.get_version_string()


class Z3Ops:
    """The patterns.ops interface on Z3 terms; random links are uninterpreted (any choice of links)."""

    name = "z3"

    def __init__(self) -> None:
        self._links: dict = {}

    @staticmethod
    def _b(x):
        return z3.BoolVal(bool(x)) if isinstance(x, (bool, np.bool_)) else x

    def and_(self, *xs):
        return z3.And(*[self._b(x) for x in xs]) if len(xs) > 1 else self._b(xs[0])

    def or_(self, *xs):
        return z3.Or(*[self._b(x) for x in xs]) if len(xs) > 1 else self._b(xs[0])

    def not_(self, x):
        return z3.Not(self._b(x))

    @staticmethod
    def const(value, like):
        return z3.BoolVal(bool(value))

    @staticmethod
    def min(a, b):
        return z3.If(a <= b, a, b)

    @staticmethod
    def max(a, b):
        return z3.If(a >= b, a, b)

    @staticmethod
    def fdiv(a, n: int):
        assert n > 0, f"floor division needs a positive constant, got {n}"
        return a / n  # Z3 integer division is floor division for a positive divisor

    @staticmethod
    def mod(a, n: int):
        assert n > 0, f"mod needs a positive constant, got {n}"
        return a % n

    def linked(self, part, qi, ki):
        key = (part.links, part.seed)
        if key not in self._links:
            self._links[key] = z3.Function(f"link_{part.links}_{part.seed}", z3.IntSort(), z3.IntSort(), z3.BoolSort())
        return self._links[key](qi, ki)


def _zmin(xs):
    out = xs[0]
    for x in xs[1:]:
        out = z3.If(x < out, x, out)
    return out


def _zmax(xs):
    out = xs[0]
    for x in xs[1:]:
        out = z3.If(x > out, x, out)
    return out


class _SymbolicLayout:
    """One row of at most ``m`` segments: boundaries b[0]=0 <= ... <= b[m]=N, domains d[j] in 0..D (D = pad)."""

    def __init__(self, num_domains: int, max_len: int, max_segments: int):
        self.D, self.m = num_domains, max_segments
        self.N = z3.Int("N")
        self.b = [z3.IntVal(0)] + [z3.Int(f"b{j}") for j in range(1, max_segments)] + [self.N]
        self.d = [z3.Int(f"d{j}") for j in range(max_segments)]
        cons = [self.N >= 1, self.N <= max_len]
        cons += [self.b[j] <= self.b[j + 1] for j in range(max_segments)]
        cons += [z3.And(dj >= 0, dj <= num_domains) for dj in self.d]
        # INVARIANT: padding only at the end of a row (Layout right-pads), so index == position.
        cons += [z3.Implies(self.d[j] == num_domains, self.d[j + 1] == num_domains) for j in range(max_segments - 1)]
        self.constraints = cons

    def _prefix(self, r: int, j: int):
        """Tokens of domain r in segments before j."""
        terms = [z3.If(self.d[i] == r, self.b[i + 1] - self.b[i], 0) for i in range(j)]
        return z3.Sum(terms) if terms else z3.IntVal(0)

    def token(self, p) -> TokenAttrs:
        """Attributes of the token at position p (0 <= p < N)."""
        ranks = []
        for j in range(self.m):
            same = [z3.If(self.d[i] == self.d[j], self.b[i + 1] - self.b[i], 0) for i in range(j)]
            ranks.append((z3.Sum(same) if same else z3.IntVal(0)) + p - self.b[j])
        dom, rank = self.d[self.m - 1], ranks[self.m - 1]
        for j in reversed(range(self.m - 1)):
            inside = p < self.b[j + 1]
            dom, rank = z3.If(inside, self.d[j], dom), z3.If(inside, ranks[j], rank)
        return TokenAttrs(dom, p, rank)

    def summary(self, start, end):
        """Per-domain presence and Spans of the tile of positions [start, end] (end inclusive)."""
        present = []
        spans = []
        for r in range(self.D + 1):
            conds, los, his, rlos, rhis = [], [], [], [], []
            for j in range(self.m):
                meets = z3.And(self.d[j] == r, self.b[j] < self.b[j + 1], self.b[j] <= end, self.b[j + 1] - 1 >= start)
                conds.append(meets)
                if r < self.D:
                    lo = ZOPS.max(self.b[j], start)
                    hi = ZOPS.min(self.b[j + 1] - 1, end)
                    pre = self._prefix(r, j)
                    los.append(z3.If(meets, lo, _ZBIG))
                    his.append(z3.If(meets, hi, -_ZBIG))
                    rlos.append(z3.If(meets, pre + lo - self.b[j], _ZBIG))
                    rhis.append(z3.If(meets, pre + hi - self.b[j], -_ZBIG))
            present.append(z3.Or(conds))
            if r < self.D:
                spans.append(Span(_zmin(los), _zmax(his), _zmin(rlos), _zmax(rhis)))
        return present, spans


ZOPS = Z3Ops()


def _rel_formula(rel: np.ndarray, dq, dk):
    """Z3: rel[dq, dk] for a concrete bool table (pad row/column included)."""
    pairs = [z3.And(dq == int(r), dk == int(s)) for r, s in zip(*np.nonzero(rel))]
    return z3.Or(pairs) if pairs else z3.BoolVal(False)


def _in_group(dq, doms):
    return z3.Or([dq == d for d in doms]) if len(doms) > 1 else dq == doms[0]


def _classifier(d: int, rel: np.ndarray, rules, q_sum, k_sum, ops: Z3Ops):
    """(FULL, some-pair-possible) of one tile pair from its summaries, as blockmap._classify computes them.

    ``q_sum``/``k_sum`` = (presence per id 0..D, Span per real domain 0..D-1).
    """
    q_present, q_spans = q_sum
    k_present, k_spans = k_sum
    no_forbidden = z3.And(
        [z3.Not(z3.And(q_present[r], k_present[s])) for r in range(d + 1) for s in range(d + 1) if not rel[r, s]] or [z3.BoolVal(True)]
    )
    k_all = Span(
        _zmin([s.lo for s in k_spans]), _zmax([s.hi for s in k_spans]), _zmin([s.rlo for s in k_spans]), _zmax([s.rhi for s in k_spans])
    )
    any_terms, all_terms = [], []
    for r in range(d):
        rule = rules[r]
        if not rule.dense:
            all_terms.append(z3.Or(z3.Not(q_present[r]), rule.tile_all(ops, q_spans[r], k_all)))
        srcs = [s for s in range(d) if rel[r, s]]
        if not srcs:
            continue  # no allowed key: blockmap's k_has_allowed is False for r
        allowed = Span(
            _zmin([k_spans[s].lo for s in srcs]), _zmax([k_spans[s].hi for s in srcs]), _zmin([k_spans[s].rlo for s in srcs]), None
        )
        has_allowed = z3.Or([k_present[s] for s in srcs])
        hit = z3.BoolVal(True) if rule.dense else rule.tile_any(ops, q_spans[r], allowed)
        any_terms.append(z3.And(q_present[r], has_allowed, hit))
    full = z3.And([no_forbidden] + all_terms)
    any_ = z3.Or(any_terms) if any_terms else z3.BoolVal(False)
    return full, any_


def _witness(model, lay: _SymbolicLayout, compiled, extra: dict) -> dict:
    ev = lambda x: model.eval(x, model_completion=True).as_long()  # noqa: E731
    names = list(compiled.domains) + ["<pad>"]
    segs = []
    for j in range(lay.m):
        lo, hi = ev(lay.b[j]), ev(lay.b[j + 1])
        if hi > lo:
            segs.append({"domain": names[ev(lay.d[j])], "domain_id": ev(lay.d[j]), "start": lo, "end": hi})
    out = {"seq_len": ev(lay.N), "segments": segs}
    out.update({k: (ev(v) if isinstance(v, z3.ArithRef) else v) for k, v in extra.items()})
    return out


def _tiles_query(compiled, layer, rules, block_q, block_k, max_len, max_segments, decode, timeout_ms, whole_tiles=False):
    """Solve one (relation, rules) instance; returns (status, witness | None, reason | None)."""
    rel = compiled.relation(layer).numpy()
    lay = _SymbolicLayout(compiled.num_domains, max_len, max_segments)
    ops = Z3Ops()
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(lay.constraints)
    N = lay.N
    nq = z3.Int("Nq")
    if decode:
        s.add(nq >= 1, nq <= N)
    else:
        s.add(nq == N)
    if whole_tiles:
        s.add(N % block_q == 0, N % block_k == 0, nq % block_q == 0)
    off = N - nq
    tq, tk, q, k = z3.Ints("tq tk q k")
    qs = off + tq * block_q
    qe = ZOPS.min(qs + block_q, N) - 1
    ks = tk * block_k
    ke = ZOPS.min(ks + block_k, N) - 1
    s.add(tq >= 0, qs < N, tk >= 0, ks < N, q >= qs, q <= qe, k >= ks, k <= ke)
    full, any_ = _classifier(lay.D, rel, rules, lay.summary(qs, qe), lay.summary(ks, ke), ops)
    qa, ka = lay.token(q), lay.token(k)
    extra = {"layer": layer, "q_len": nq, "query_tile": tq, "key_tile": tk, "query": q, "key": k, "block_size": [block_q, block_k]}
    return _refute(s, ops, rel, rules, full, any_, qa, ka, lambda m, label: _witness(m, lay, compiled, {**extra, "kind": label}))


def _refute(s, ops, rel, rules, full, any_, qa, ka, witness_fn):
    """Look for a FULL tile over a forbidden pair, then an EMPTY tile over an allowed pair (qa, ka)."""
    allowed = pair_mask(ops, lambda a, b: _rel_formula(rel, a, b), _in_group, rules, qa, ka)
    # The builder marks every tile holding an allowed random link (blockmap._random_hits).
    rand_hit = z3.Bool("random_hit")
    rand_terms = [
        z3.And(_in_group(qa.domain, doms), z3.Or([part.mask(ops, qa, ka) for part in rule.random_parts]))
        for rule, doms in group_domains(rules).items()
        if rule.random_parts
    ]
    if rand_terms:
        s.add(z3.Implies(z3.And(_rel_formula(rel, qa.domain, ka.domain), z3.Or(rand_terms)), rand_hit))
    else:
        s.add(z3.Not(rand_hit))
    empty = z3.And(z3.Not(full), z3.Not(any_), z3.Not(rand_hit))
    # Two smaller queries (FULL over a forbidden pair; EMPTY over an allowed one) solve faster than their disjunction.
    for label, bad in (("FULL", z3.And(full, z3.Not(allowed))), ("EMPTY", z3.And(empty, allowed))):
        s.push()
        s.add(bad)
        res, why = _solver_check(s)
        if res == "sat":
            wit = witness_fn(s.model(), label)
            wit["pair_allowed"] = label == "EMPTY"
            return Status.REFUTED, wit, "the classifier mislabels a tile: " + (
                "FULL tile holds a forbidden pair" if label == "FULL" else "EMPTY tile holds an allowed pair"
            )
        s.pop()
        if res != "unsat":
            return Status.UNKNOWN, None, f"z3 ({label} case): {why}"
    return Status.PROVED, None, None


def _abstract_summary(tag: str, d: int):
    """Free per-tile summaries: any token set whose per-domain spans are these (sentinels when absent)."""
    present = [z3.Bool(f"{tag}_has{r}") for r in range(d + 1)]
    spans, cons = [], []
    for r in range(d):
        sp = Span(*z3.Ints(f"{tag}_lo{r} {tag}_hi{r} {tag}_rlo{r} {tag}_rhi{r}"))
        cons.append(
            z3.If(
                present[r],
                z3.And(0 <= sp.lo, sp.lo <= sp.hi, sp.hi < _ZBIG, 0 <= sp.rlo, sp.rlo <= sp.rhi, sp.rhi < _ZBIG),
                z3.And(sp.lo == _ZBIG, sp.hi == -_ZBIG, sp.rlo == _ZBIG, sp.rhi == -_ZBIG),
            )
        )
        spans.append(sp)
    return (present, spans), cons


def _member(tag: str, d: int, summary):
    """A token of the summarised set: its domain is present and its attributes lie in that domain's span."""
    present, spans = summary
    tok = TokenAttrs(*z3.Ints(f"{tag}_dom {tag}_idx {tag}_rank"))
    cons = [tok.domain >= 0, tok.domain <= d, z3.Or([z3.And(tok.domain == r, present[r]) for r in range(d + 1)])]
    for r in range(d):
        sp = spans[r]
        cons.append(z3.Implies(tok.domain == r, z3.And(sp.lo <= tok.index, tok.index <= sp.hi, sp.rlo <= tok.rank, tok.rank <= sp.rhi)))
    return tok, cons


def _rules_query(compiled, layer, rules, timeout_ms):
    """One (relation, rules) instance of prove_tile_rules_sound."""
    d = compiled.num_domains
    rel = compiled.relation(layer).numpy()
    ops = Z3Ops()
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    q_sum, cq = _abstract_summary("q", d)
    k_sum, ck = _abstract_summary("k", d)
    qa, mq = _member("q", d, q_sum)
    ka, mk = _member("k", d, k_sum)
    s.add(cq + ck + mq + mk)
    full, any_ = _classifier(d, rel, rules, q_sum, k_sum, ops)
    names = list(compiled.domains) + ["<pad>"]

    def witness(m, label):
        ev = lambda x: m.eval(x, model_completion=True)  # noqa: E731
        out = {"layer": layer, "kind": label}
        for side, tok, (present, spans) in (("query", qa, q_sum), ("key", ka, k_sum)):
            out[side] = {"domain": names[ev(tok.domain).as_long()], "index": ev(tok.index).as_long(), "rank": ev(tok.rank).as_long()}
            out[f"{side}_tile"] = {
                names[r]: ([ev(spans[r].lo).as_long(), ev(spans[r].hi).as_long()] if r < d else "present")
                for r in range(d + 1)
                if z3.is_true(ev(present[r]))
            }
        return out

    return _refute(s, ops, rel, rules, full, any_, qa, ka, witness)


def _instances(compiled, layers, heads, rules):
    """Distinct (layer, head, rules) instances: layers/heads with identical tables are solved once."""
    layers = range(compiled.num_layers) if layers is None else layers
    heads = representative_heads(compiled) if heads is None else heads
    seen: dict = {}
    for layer in layers:
        for head in heads:
            rs = tuple(rules) if rules is not None else rules_for(compiled, layer, head)
            key = (compiled.relation(layer).numpy().tobytes(), rs)
            seen.setdefault(key, (layer, head, rs))
    return list(seen.values())


def _tiles_claim(kind, statement, compiled, *, block_q, block_k, max_len, max_segments, layers, heads, rules, decode, timeout_ms, whole_tiles):
    if not 1 <= max_len < _ZBIG or max_segments < 1 or block_q < 1 or block_k < 1:
        raise LayoutError(
            f"proof scope out of range: max_len={max_len} (1..{_ZBIG - 1}), max_segments={max_segments}, "
            f"block {block_q}x{block_k}",
            code="DG309",
        )
    t0 = time.perf_counter()
    results = []
    witness = reason = None
    for layer, head, rs in _instances(compiled, layers, heads, rules):
        status, wit, why = _tiles_query(compiled, layer, rs, block_q, block_k, max_len, max_segments, decode, timeout_ms, whole_tiles)
        results.append(status)
        if status is Status.REFUTED and witness is None:
            witness, reason = {"head": head, **wit}, why
        elif status is Status.UNKNOWN and reason is None:
            reason = f"layer {layer} head {head}: {why}"
    status = combine_status(results)
    return {
        "id": f"{kind}[block={block_q}x{block_k},max_len={max_len},segments={max_segments}]",
        "kind": kind,
        "statement": statement,
        "scope": {
            "layers": list(range(compiled.num_layers)) if layers is None else list(layers),
            "heads": "all" if heads is None else list(heads),
            "profile": getattr(compiled, "profile", None),
            "block_size": [block_q, block_k],
            "max_seq_len": max_len,
            "max_segments": max_segments,
            "queries": "the last Nq tokens, every 1 <= Nq <= N" if decode else "all N tokens",
            "lengths": "multiples of the block sizes" if whole_tiles else "every N <= max_seq_len",
            "layouts": "every row of at most max_segments domain segments, padding only at the end",
            "rules": "custom" if rules is not None else "policy",
        },
        "method": {"name": "z3", "version": Z3_VERSION, "seconds": round(time.perf_counter() - t0, 6)},
        "status": status.value,
        "witness": [witness] if witness else None,
        "reason": reason if status is not Status.PROVED else None,
        "details": {"instances": len(results)},
    }


def prove_tiles_sound(
    compiled,
    *,
    block_q: int = 128,
    block_k: int | None = None,
    max_len: int = 1 << 17,
    max_segments: int = 6,
    layers=None,
    heads=None,
    rules=None,
    timeout_ms: int = 60_000,
    whole_tiles: bool = False,
) -> dict:
    """Claim: the tile classifier never mislabels a tile, for every layout in scope.

    PROVED means: for every layer (and every head class of per-head patterns), every row of
    N <= max_len tokens made of <= max_segments segments (each one domain, padding only at the
    end), and every query tile × key tile of block_q × block_k tokens, the kind that
    blockmap's rules compute from the tile summaries is FULL only if every pair in the tile is
    allowed by the dense reference (relation AND pattern), and EMPTY only if no pair is —
    for every choice of random links. REFUTED carries a counterexample layout and pair.
    ``rules`` (one MaskRule per domain) replaces the policy's patterns, for testing classifiers;
    ``whole_tiles`` narrows the scope to lengths that are multiples of the block sizes.
    """
    return _tiles_claim(
        "tiles-sound",
        "FULL tiles hold no forbidden pair and EMPTY tiles no allowed pair, for every layout in scope",
        compiled,
        block_q=block_q,
        block_k=block_k or block_q,
        max_len=max_len,
        max_segments=max_segments,
        layers=layers,
        heads=heads,
        rules=rules,
        decode=False,
        timeout_ms=timeout_ms,
        whole_tiles=whole_tiles,
    )


def prove_decode_alignment(
    compiled,
    *,
    block_q: int = 128,
    block_k: int | None = None,
    max_len: int = 1 << 17,
    max_segments: int = 6,
    layers=None,
    heads=None,
    rules=None,
    timeout_ms: int = 60_000,
    whole_tiles: bool = False,
) -> dict:
    """Claim: tiles stay sound when queries are the last Nq of N tokens (decode, Nq != Nk).

    PROVED means what ``prove_tiles_sound`` means, with the query tiles cut over the last Nq
    tokens for every 1 <= Nq <= N (so query tile t starts at token N − Nq + t·block_q):
    causal and every pattern are aligned by sequence index, never by tile number.
    """
    return _tiles_claim(
        "decode-alignment",
        "with queries the last Nq of N tokens (decode), FULL tiles hold no forbidden pair and EMPTY tiles no allowed pair",
        compiled,
        block_q=block_q,
        block_k=block_k or block_q,
        max_len=max_len,
        max_segments=max_segments,
        layers=layers,
        heads=heads,
        rules=rules,
        decode=True,
        timeout_ms=timeout_ms,
        whole_tiles=whole_tiles,
    )


def prove_tile_rules_sound(compiled, *, layers=None, heads=None, rules=None, timeout_ms: int = 60_000) -> dict:
    """Claim: the tile rules are sound for every tile summary — any token order, any length.

    PROVED means: for every layer and head class, every query tile and key tile whose tokens
    have, per domain, sequence indices and ranks inside the summarised spans (the summaries
    blockmap computes as exact per-domain min/max; padding present or not), the kind the
    rules compute is FULL only if every (query, key) pair of such tokens is allowed by the
    dense reference, and EMPTY only if none is — for every choice of random links. No bound on
    length (below the builder's 2**29-token limit), segment count or token order: this covers
    the kernel's domain-sorted tiles. It relies on the summaries being exact, which
    ``check_blockmap`` re-checks on concrete layouts.
    """
    t0 = time.perf_counter()
    statuses, witness, reason = [], None, None
    for layer, head, rs in _instances(compiled, layers, heads, rules):
        status, wit, why = _rules_query(compiled, layer, rs, timeout_ms)
        statuses.append(status)
        if status is Status.REFUTED and witness is None:
            witness, reason = {"head": head, **wit}, why
        elif status is Status.UNKNOWN and reason is None:
            reason = f"layer {layer} head {head}: {why}"
    status = combine_status(statuses)
    return {
        "id": "tile-rules-sound",
        "kind": "tile-rules-sound",
        "statement": "from exact per-domain tile summaries, FULL implies every pair allowed and EMPTY implies none, "
        "for tiles of any size over tokens in any order",
        "scope": {
            "layers": list(range(compiled.num_layers)) if layers is None else list(layers),
            "heads": "all" if heads is None else list(heads),
            "profile": getattr(compiled, "profile", None),
            "block_size": "any",
            "max_seq_len": _ZBIG - 1,
            "layouts": "any token sets (any order, any segment count); summaries assumed exact",
            "rules": "custom" if rules is not None else "policy",
        },
        "method": {"name": "z3", "version": Z3_VERSION, "seconds": round(time.perf_counter() - t0, 6)},
        "status": status.value,
        "witness": [witness] if witness else None,
        "reason": reason if status is not Status.PROVED else None,
        "details": {"instances": len(statuses)},
    }


def prove_patterns_within_policy(compiled, *, layers=None, heads=None, timeout_ms: int = 60_000) -> dict:
    """Claim: no pattern adds a pair the policy's relation forbids.

    PROVED means: for every layer and head class, and every query/key token — any domain ids
    (padding included), any sequence indices and ranks, any random links — the mask the
    compiler evaluates (patterns.pair_mask over ``compiled.relation(layer)`` and the
    patterns) allows the pair only if the policy's table ``compiled.relations[layer]`` lets
    the query's domain read the key's domain. No layout bound: the argument is per pair.
    """
    t0 = time.perf_counter()
    statuses, witness, reason = [], None, None
    d = compiled.num_domains
    for layer, head, rules in _instances(compiled, layers, heads, None):
        rel = compiled.relation(layer).numpy()
        policy_rel = np.zeros((d + 1, d + 1), dtype=bool)
        policy_rel[:d, :d] = np.asarray(compiled.relations[layer])
        q = TokenAttrs(*z3.Ints("dq iq rq"))
        k = TokenAttrs(*z3.Ints("dk ik rk"))
        s = z3.Solver()
        s.set("timeout", timeout_ms)
        s.add(q.domain >= 0, q.domain <= d, k.domain >= 0, k.domain <= d)
        mask = pair_mask(Z3Ops(), lambda a, b: _rel_formula(rel, a, b), _in_group, rules, q, k)
        s.add(mask, z3.Not(_rel_formula(policy_rel, q.domain, k.domain)))
        res, why = _solver_check(s)
        if res == "unsat":
            statuses.append(Status.PROVED)
        elif res == "sat":
            statuses.append(Status.REFUTED)
            m = s.model()
            names = list(compiled.domains) + ["<pad>"]
            if witness is None:
                witness = {
                    "layer": layer,
                    "head": head,
                    "reader": names[m.eval(q.domain, model_completion=True).as_long()],
                    "source": names[m.eval(k.domain, model_completion=True).as_long()],
                }
                reason = "a pattern admits a pair the policy forbids"
        else:
            statuses.append(Status.UNKNOWN)
            reason = reason or f"layer {layer} head {head}: z3: {why}"
    status = combine_status(statuses)
    return {
        "id": "patterns-within-policy",
        "kind": "patterns-within-policy",
        "statement": "no sparsity pattern admits a token pair that the policy's relation forbids",
        "scope": {
            "layers": list(range(compiled.num_layers)) if layers is None else list(layers),
            "heads": "all" if heads is None else list(heads),
            "profile": getattr(compiled, "profile", None),
            "max_seq_len": None,
            "layouts": "every token pair, any order, any length",
        },
        "method": {"name": "z3", "version": Z3_VERSION, "seconds": round(time.perf_counter() - t0, 6)},
        "status": status.value,
        "witness": [witness] if witness else None,
        "reason": reason if status is not Status.PROVED else None,
        "details": {"instances": len(statuses)},
    }


def replay_witness(witness: dict, compiled, *, rules=None):
    """Rebuild a Z3 counterexample on real tensors: (layout, blockmap, exhaustive check result)."""
    from .blockmap import build_blockmap_from_attrs
    from .layout import Layout

    ids = torch.full((1, witness["seq_len"]), compiled.pad_id, dtype=torch.long)
    for seg in witness["segments"]:
        ids[0, seg["start"] : seg["end"]] = seg["domain_id"]
    layout = Layout.from_ids(compiled, ids)
    bq, bk = witness["block_size"]
    q_len = witness.get("q_len", witness["seq_len"])
    head = witness.get("head", 0)
    rule_rows = None if rules is None else [tuple(rules)]
    bm = build_blockmap_from_attrs(
        layout.attrs(q_len), layout.attrs(), compiled, witness["layer"], block_q=bq, block_k=bk, heads=[head], rules=rule_rows
    )
    return layout, bm, check_blockmap(bm, compiled)


def validation_claims(
    compiled,
    *,
    block_sizes=(128, 64),
    max_len: int = 1 << 17,
    max_segments: int = 4,
    layouts=(),
    timeout_ms: int = 120_000,
) -> list[dict]:
    """Every claim of this module for a certificate: Z3 proofs per block size, plus exhaustive re-checks.

    ``layouts`` are concrete Layouts (e.g. the leak-test prompts) whose tables are re-derived
    from the dense reference at every layer and block size.
    """
    from .blockmap import build_blockmap

    claims = [prove_patterns_within_policy(compiled, timeout_ms=timeout_ms), prove_tile_rules_sound(compiled, timeout_ms=timeout_ms)]
    for b in block_sizes:
        scope = dict(block_q=b, max_len=max_len, max_segments=max_segments, timeout_ms=timeout_ms)
        claims += [prove_tiles_sound(compiled, **scope), prove_decode_alignment(compiled, **scope)]
    heads = list(representative_heads(compiled))
    for n, layout in enumerate(layouts):
        for b in block_sizes:
            per_layer = [check_blockmap(build_blockmap(layout, compiled, layer, block_q=b, block_k=b, head=heads), compiled)
                         for layer in range(compiled.num_layers)]
            claims.append(_merge_layers(per_layer, f"tables-exhaustive[layout={n},block={b}]"))
    return claims


def _merge_layers(per_layer: list[dict], claim_id: str) -> dict:
    """One claim for a layout's tables at every layer: REFUTED if any layer's is, with that layer's witness."""
    first = per_layer[0]
    bad = next((c for c in per_layer if c["status"] != "PROVED"), None)
    totals = {key: sum(c["details"][key] for c in per_layer) for key in first["details"]}
    scope = {k: v for k, v in first["scope"].items() if k != "layer"}
    return {
        **first,
        "id": claim_id,
        "scope": {**scope, "layers": [c["scope"]["layer"] for c in per_layer]},
        "method": {**first["method"], "seconds": round(sum(c["method"]["seconds"] for c in per_layer), 6)},
        "status": combine_status(Status(c["status"]) for c in per_layer).value,
        "witness": [{"layer": bad["scope"]["layer"], **w} for w in bad["witness"] or []] if bad else None,
        "details": totals,
    }
