"""Verifier: witnesses on hand-made cases, and a brute-force token-level simulation in both directions."""

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import domainguard as dg
from domainguard.verdict import Status
from domainguard.verify import explain_flow


def _compile(doc: dict, layers=None, profile=None):
    return dg.compile(dg.loads_policy(yaml.safe_dump(doc, sort_keys=False)), layers=layers, profile=profile)


def test_decode_feedback_is_a_path():
    # answer reads notes; notes reads answer: a generated token carries secret's info back.
    doc = {
        "domainguard": 1, "name": "t",
        "domains": {"secret": {}, "notes": {}, "answer": {}, "log": {}},
        "reads": {"answer": ["secret"], "log": ["answer"]},
        "forbid": [{"flow": {"from": "secret", "to": "log"}}],
        "generation": {"domain": "answer"},
    }
    v = dg.verify(_compile(doc, layers=1))
    r = v.result("forbid[0]")
    # One layer: secret→answer@1 needs a second layer to reach log, which only decoding provides.
    assert r.status is Status.REFUTED
    assert str(r.witness[0]) == "secret@0 → answer@1 ↻ answer@0 → log@1"
    doc.pop("generation")
    assert dg.verify(_compile(doc, layers=1)).result("forbid[0]").status is Status.PROVED


def test_combine_reports_both_paths_to_the_mixing_node():
    doc = {
        "domainguard": 1, "name": "t",
        "domains": {"a": {}, "b": {}, "mid": {}, "out": {}},
        "reads": {"mid": ["a"], "out": ["mid", "b"]},
        "forbid": [{"combine": ["a", "b"]}],
    }
    r = dg.verify(_compile(doc, layers=3)).result("forbid[0]")
    assert r.status is Status.REFUTED
    # b reaches out at level 1 and the residual stream keeps it until a arrives at level 2.
    assert [str(p) for p in r.witness] == ["a@0 → mid@1 → out@2", "b@0 → out@1"]


def test_explain_names_the_entries_to_drop():
    doc = {
        "domainguard": 1, "name": "t",
        "domains": {"tox": {}, "summary": {}, "answer": {}, "side": {}},
        "reads": {"summary": ["tox"], "side": ["tox"], "answer": ["summary", "side"]},
        "forbid": [{"flow": {"from": "tox", "to": "answer"}}],
    }
    c = _compile(doc, layers=4)
    r = dg.verify(c, suggest=True)
    exp = r.result("forbid[0]").details["explanation"]
    # Two independent paths: no single entry restores the rule.
    assert exp["drop_one_of"] == []
    assert set(exp["relies_on"]) <= {"reads.summary[0]", "reads.side[0]", "reads.answer[0]", "reads.answer[1]"}
    # The MaxSAT suggestion drops as few entries as possible and really restores the rule.
    assert r.suggestion["status"] == "PROVED" and len(r.suggestion["drop"]) == 2
    res = explain_flow(c, "tox", "answer")
    assert res.status is Status.REFUTED


def test_unknown_never_passes(monkeypatch):
    import z3

    from domainguard import solver

    monkeypatch.setattr(solver, "check", lambda s, *a: (Status.UNKNOWN, "timeout"))
    c = _compile({"domainguard": 1, "name": "t", "domains": {"a": {}, "b": {}}, "reads": {"a": ["b"]},
                  "profiles": {"p": {"reads": {"a": []}}}}, layers=2)
    v = dg.verify(c)
    assert v.result("profile[p]").status is Status.UNKNOWN
    assert v.status is Status.UNKNOWN
    del z3


# --- brute force -----------------------------------------------------------------------
@st.composite
def policies(draw):
    n = draw(st.integers(2, 5))
    names = [f"d{i}" for i in range(n)]
    parents = [draw(st.integers(-1, i - 1)) if i else -1 for i in range(n)]
    tree: dict = {}
    nodes = {}
    for i, p in enumerate(parents):
        node: dict = {}
        nodes[i] = node
        (tree if p < 0 else nodes[p].setdefault("children", {}))[names[i]] = node
    reads = {}
    for i in range(n):
        srcs = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
        if srcs:
            reads[names[i]] = srcs
    layers = draw(st.integers(1, 3))
    overrides = []
    if layers > 1 and draw(st.booleans()):
        r = draw(st.sampled_from(names))
        overrides.append({"layers": f"0-{draw(st.integers(0, layers - 2))}",
                          "reads": {r: draw(st.lists(st.sampled_from(names), max_size=2, unique=True))}})
    gen = draw(st.sampled_from(names + [None]))
    doc = {"domainguard": 1, "name": "random", "domains": tree, "reads": reads, "layers": overrides}
    if gen:
        doc["generation"] = {"domain": gen}
    return doc, layers


def _simulate(compiled, a_ids, b_ids, kind: str, rounds=3, decode=3) -> bool:
    """Token-level: causal attention over a layout that repeats every domain, with decoding and later turns."""
    D, L, g = compiled.num_domains, compiled.num_layers, compiled.generation_id
    rel = compiled.relations
    doms: list[int] = []
    state: list[list[int]] = []  # state[p][l]: bitmask of origin tokens held by token p at level l
    origin_dom: list[int] = []

    def add(d: int, carried: int) -> None:
        p = len(doms)
        doms.append(d)
        origin_dom.append(d)
        levels = [(1 << p) | carried]
        for l in range(L):
            s = levels[l]
            for q in range(p):
                if rel[l, d, doms[q]]:
                    s |= state[q][l]
            levels.append(s)
        state.append(levels)

    for _ in range(rounds):
        for _ in range(L + 2):
            for d in range(D):
                add(d, 0)
        if g is not None:
            add(g, 0)
            for _ in range(decode):
                add(g, state[-1][L])
    a_mask = sum(1 << p for p, d in enumerate(origin_dom) if d in a_ids)
    b_mask = sum(1 << p for p, d in enumerate(origin_dom) if d in b_ids)
    for p, d in enumerate(doms):
        for s in state[p]:
            if kind == "flow" and d in b_ids and s & a_mask:
                return True
            if kind == "combine" and s & a_mask and s & b_mask:
                return True
    return False


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.data())
def test_verifier_matches_token_level_simulation(pl, data):
    doc, layers = pl
    compiled = _compile(doc, layers=layers)
    names = compiled.domains
    a, b = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    ta, tb = compiled.flow.tree.subtree(compiled.id_of(a)), compiled.flow.tree.subtree(compiled.id_of(b))
    if set(ta) & set(tb):
        return
    kind = data.draw(st.sampled_from(["flow", "combine"]))
    rule = {"flow": {"from": a, "to": b}} if kind == "flow" else {"combine": [a, b]}
    compiled = _compile({**doc, "forbid": [rule]}, layers=layers)
    r = dg.verify(compiled, explain=False).result("forbid[0]")
    leaks = _simulate(compiled, set(ta), set(tb), kind)
    assert (r.status is Status.REFUTED) == leaks, (doc, rule, r.status, [str(w) for w in r.witness])
    if r.status is Status.REFUTED:
        # The witness is a real path: each hop is allowed by the relation of its layer.
        for path in r.witness:
            for x, y in zip(path.steps, path.steps[1:]):
                if y.via == "attention":
                    assert compiled.relations[y.level - 1, compiled.id_of(y.domain), compiled.id_of(x.domain)]
                    assert y.level > x.level or x.via == "decode"


# --- any depth ------------------------------------------------------------------------------
LAST_OVERRIDE_HIDES_BASE = {
    "domainguard": 1, "name": "overrides-then-base",
    "domains": {"instr": {}, "secret": {}, "answer": {}},
    "reads": {"answer": ["instr", "secret"]},
    "layers": [{"layers": "0-1", "reads": {"answer": ["instr"]}}],
    "forbid": [{"flow": {"from": "secret", "to": "answer"}}],
}


def test_any_depth_counts_the_base_reads_beyond_the_overridden_layers():
    """Overrides name layers 0-1 only: every deeper layer of a model of unknown depth reads with the base
    entry, which lets answer read secret. No depth given means any depth, so this must be REFUTED."""
    for layers in (3, 4, 10):
        assert dg.verify(_compile(LAST_OVERRIDE_HIDES_BASE, layers=layers)).status is Status.REFUTED
    v = dg.verify(_compile(LAST_OVERRIDE_HIDES_BASE))
    assert v.status is Status.REFUTED and v.result("forbid[0]").witness
    assert explain_flow(_compile(LAST_OVERRIDE_HIDES_BASE), "secret", "answer").status is Status.REFUTED
    # At a depth the overrides cover entirely, the base entry never applies: PROVED there.
    assert dg.verify(_compile(LAST_OVERRIDE_HIDES_BASE, layers=2)).status is Status.PROVED


def test_a_profile_hidden_by_an_override_is_still_seen_to_widen_at_any_depth():
    doc = {**LAST_OVERRIDE_HIDES_BASE, "reads": {"answer": ["instr"]},
           "layers": [{"layers": "0", "reads": {"answer": ["instr"]}}],
           "profiles": {"public": {"reads": {"answer": ["instr", "secret"]}}}}
    assert dg.verify(_compile(doc)).result("profile[public]").status is Status.REFUTED
    assert dg.verify(_compile(doc, profile="public")).status is Status.REFUTED


def test_an_open_layer_range_beyond_the_model_is_a_policy_error():
    doc = {**LAST_OVERRIDE_HIDES_BASE, "layers": [{"layers": "3-", "reads": {"answer": ["instr"]}}]}
    with pytest.raises(dg.PolicyError) as e:
        _compile(doc, layers=2)
    assert e.value.code == "DG107" and e.value.location is not None and e.value.location.line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.data())
def test_any_depth_verdict_is_sound_for_every_depth(pl, data):
    """Without a depth, PROVED must hold at every depth the policy can be compiled for (a deeper model
    reads with the base entries past the overridden layers), and a profile PROVED to only tighten must
    tighten at every such depth."""
    doc, _ = pl
    names = [n for n in _compile(doc).domains]
    # Overrides at single layers, in any order: what an order-free closure of the layers gets wrong.
    extra = [{"layers": str(data.draw(st.integers(0, 3))),
              "reads": {data.draw(st.sampled_from(names)): data.draw(st.lists(st.sampled_from(names), max_size=2,
                                                                               unique=True))}}
             for _ in range(data.draw(st.integers(0, 3)))]
    doc = {**doc, "layers": list(doc.get("layers", [])) + extra}
    a, b = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    kind = data.draw(st.sampled_from(["flow", "combine"]))
    rule = {"flow": {"from": a, "to": b}} if kind == "flow" else {"combine": [a, b]}
    wide = data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    doc = {**doc, "forbid": [rule], "profiles": {"p": {"reads": {data.draw(st.sampled_from(names)): wide}}}}
    try:
        any_depth = dg.verify(_compile(doc), explain=False)
    except dg.PolicyError:
        return  # overlapping subtrees in the rule, or two overrides of one reader at a layer: refused at every depth
    top = _compile(doc).num_layers
    refuted = {"forbid[0]": False, "profile[p]": False}
    for layers in range(top - 1 if top > 1 else 1, top + len(names) + 2):
        try:
            at = dg.verify(_compile(doc, layers=layers), explain=False)
        except dg.PolicyError:
            continue  # fewer layers than an override names
        for rid in ("forbid[0]", "profile[p]"):
            if any_depth.result(rid).status is Status.PROVED:
                assert at.result(rid).status is Status.PROVED, (doc, rid, layers)
            refuted[rid] |= at.result(rid).status is Status.REFUTED
    # ... and exact: REFUTED only where some depth refutes.
    for rid, some in refuted.items():
        assert (any_depth.result(rid).status is Status.REFUTED) == some, (doc, rid)


def test_any_depth_respects_the_order_of_layers():
    """c reads b only at layer 0, b reads a only at layer 1, and no layer reads anything after: a's
    information never reaches c at any depth (an order-free closure of the layers would say it does)."""
    doc = {"domainguard": 1, "name": "order", "domains": {"a": {}, "b": {}, "c": {}},
           "layers": [{"layers": "0", "reads": {"c": ["b"]}}, {"layers": "1", "reads": {"b": ["a"]}}],
           "forbid": [{"flow": {"from": "a", "to": "c"}}]}
    assert dg.verify(_compile(doc)).status is Status.PROVED
    assert explain_flow(_compile(doc), "a", "c").status is Status.PROVED
    swapped = {**doc, "layers": [{"layers": "1", "reads": {"c": ["b"]}}, {"layers": "0", "reads": {"b": ["a"]}}]}
    v = dg.verify(_compile(swapped))
    assert v.status is Status.REFUTED and v.result("forbid[0]").scope["layers"] == "any"
    assert str(v.result("forbid[0]").witness[0]) == "a@0 → b@1 → c@2"


def test_index_patterns_of_a_domain_with_forbidden_sources_are_a_finding():
    """A window counts every token of the row: the length of a forbidden segment before the answer moves
    the window over what the answer may read (measured: logits moved by 0.13 under positions: per_domain)."""
    doc = {"domainguard": 1, "name": "window", "positions": "per_domain",
           "domains": {"system": {}, "secret": {}, "answer": {}},
           "reads": {"answer": ["system"], "secret": ["system"]},
           "patterns": {"default": {"causal": True}, "answer": {"causal": True, "window": 8}},
           "forbid": [{"flow": {"from": "secret", "to": "answer"}}]}
    found = [f for f in dg.verify(_compile(doc, layers=2)).findings if f["code"] == "DGF03"]
    assert len(found) == 1 and "'answer'" in found[0]["message"] and "secret" in found[0]["message"]
    plain = {**doc, "patterns": {"default": {"causal": True}}}
    assert not [f for f in dg.verify(_compile(plain, layers=2)).findings if f["code"] == "DGF03"]
    # A window limited to layers 1- is found too; one on a domain that may read everything is not.
    late = {**doc, "patterns": {"default": {"causal": True}, "answer": [{"causal": True, "window": 8, "layers": "1-"},
                                                                       {"causal": True}]}}
    assert [f for f in dg.verify(_compile(late, layers=2)).findings if f["code"] == "DGF03"]
    open_all = {**doc, "reads": {"answer": ["system", "secret"]}, "forbid": []}
    assert not [f for f in dg.verify(_compile(open_all, layers=2)).findings if f["code"] == "DGF03"]


def test_pattern_layers_without_a_depth_and_deep_overrides_without_a_depth():
    doc = {"domainguard": 1, "name": "pl", "domains": {"a": {}, "b": {}},
           "patterns": {"default": [{"causal": True, "window": 4, "layers": "0-1"}, {"causal": True, "layers": "2-"}]},
           "forbid": [{"flow": {"from": "a", "to": "b"}}]}
    assert dg.verify(_compile(doc)).status is Status.PROVED
    deep = {"domainguard": 1, "name": "deep", "domains": {"a": {}, "b": {}, "c": {}, "d": {}},
            "reads": {"b": ["a"]}, "layers": [{"layers": "4000-4094", "reads": {"b": []}}],
            "forbid": [{"flow": {"from": "a", "to": "b"}}]}
    assert dg.verify(_compile(deep)).status is Status.REFUTED  # the base reads apply before layer 4000


def test_a_long_chain_without_a_depth_is_still_explained():
    n = 120
    doc = {"domainguard": 1, "name": "chain", "domains": {f"d{i}": {} for i in range(n)},
           "reads": {f"d{i + 1}": [f"d{i}"] for i in range(n - 1)},
           "forbid": [{"flow": {"from": "d0", "to": f"d{n - 1}"}}]}
    r = dg.verify(_compile(doc)).result("forbid[0]")
    assert r.status is Status.REFUTED and r.details["explanation"]["status"] == "PROVED"
    assert r.details["explanation"]["drop_one_of"]


def test_index_patterns_found_on_heads_past_a_heads_range():
    doc = {"domainguard": 1, "name": "heads", "domains": {"system": {}, "secret": {}, "docs": {}},
           "reads": {"docs": ["system"]},
           "patterns": {"default": {"causal": True, "window": 64}, "docs": [{"heads": "0-3", "causal": True}]},
           "forbid": [{"flow": {"from": "secret", "to": "docs"}}]}
    found = [f["message"] for f in dg.verify(_compile(doc, layers=2)).findings if f["code"] == "DGF03"]
    assert any("'docs'" in m for m in found)


def test_a_widening_profile_names_its_layers_in_words_that_fit_the_depth():
    """The REFUTED profile claim names where it widens: a policy of no given depth widens at every layer, not
    at "layers 0" (its tables' one layer stands for all); past an override, "and deeper"; at a given depth,
    the layers themselves."""
    base = {"domainguard": 1, "name": "w", "domains": {"a": {}, "b": {}, "c": {}}, "reads": {"b": ["a"]}}
    wide = {**base, "profiles": {"p": {"reads": {"c": ["a"]}}}}
    assert dg.verify(_compile(wide)).result("profile[p]").reason == "widens: c ← a (every layer)"
    assert dg.verify(_compile(wide, layers=4)).result("profile[p]").reason == "widens: c ← a (every layer)"
    # Layer 0 overrides c's reads with the profile's own, so the profile widens only below it.
    late = {**wide, "layers": [{"layers": "0", "reads": {"c": ["a"]}}]}
    assert dg.verify(_compile(late)).result("profile[p]").reason == "widens: c ← a (layers 1 and deeper)"
    assert dg.verify(_compile(late, layers=4)).result("profile[p]").reason == "widens: c ← a (layers 1-3)"
