"""Translation validation: Z3 proofs of the tile rules, the exhaustive checker, and classifiers built to fail."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import domainguard as dg
from domainguard.blockmap import EMPTY, FULL, build_blockmap
from domainguard.patterns import Causal, rules_for
from domainguard.validate import (
    _merge_layers,
    check_blockmap,
    prove_decode_alignment,
    prove_patterns_within_policy,
    prove_tile_rules_sound,
    prove_tiles_sound,
    replay_witness,
)

POLICY = """
domainguard: 1
name: validate-test
domains: {sys: {}, notes: {}, secret: {}, answer: {}}
reads:
  sys: [notes]      # sys and notes read each other, so a tile may mix them and still be FULL
  notes: [sys]
  answer: [sys, notes]
patterns:
  default: {causal: true}
  sys: {causal: false}
  notes: {causal: true, window: 100, global_tokens: 4, stride: 50}
  answer: {causal: true, block_local: 32, random: {links: 2, seed: 3}}
generation: {domain: answer}
"""
SCOPE = dict(block_q=64, max_len=1000, max_segments=3)
CLAIM_KEYS = {"id", "kind", "statement", "scope", "method", "status", "witness", "reason", "details"}


@pytest.fixture(scope="module")
def compiled():
    return dg.compile(dg.loads_policy(POLICY), layers=1)


class OffByOneCausal(Causal):
    """Deliberately wrong: calls a tile fully causal when its last key is one past a query run's start."""

    def tile_all(self, ops, q, k):
        return k.hi <= q.lo + 1


def test_tiles_sound_proved(compiled):
    claim = prove_tiles_sound(compiled, **SCOPE)
    assert set(claim) == CLAIM_KEYS
    assert claim["status"] == "PROVED", claim
    assert claim["method"]["name"] == "z3" and claim["method"]["version"]
    assert claim["scope"]["max_seq_len"] == 1000 and claim["scope"]["block_size"] == [64, 64]


def test_decode_alignment_proved(compiled):
    claim = prove_decode_alignment(compiled, block_q=64, block_k=32, max_len=700, max_segments=3)
    assert claim["status"] == "PROVED", claim


def test_tile_rules_sound_for_any_order_and_length(compiled):
    claim = prove_tile_rules_sound(compiled)
    assert claim["status"] == "PROVED", claim
    bad = [
        dataclasses.replace(r, restrict=tuple(OffByOneCausal() if isinstance(p, Causal) else p for p in r.restrict))
        for r in rules_for(compiled, 0)
    ]
    refuted = prove_tile_rules_sound(compiled, rules=bad)
    assert refuted["status"] == "REFUTED" and refuted["witness"][0]["kind"] == "FULL"
    w = refuted["witness"][0]
    assert w["key"]["index"] > w["query"]["index"]  # the pair the bug lets through is not causal


def test_patterns_within_policy(compiled):
    assert prove_patterns_within_policy(compiled)["status"] == "PROVED"

    class Widened:
        """The compiled artifact's relation table lets answer read secret; the policy does not."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def relation(self, layer):
            rel = self._inner.relation(layer).clone()
            rel[self._inner.id_of("answer"), self._inner.id_of("secret")] = True
            return rel

    claim = prove_patterns_within_policy(Widened(compiled))
    assert claim["status"] == "REFUTED"
    assert claim["witness"][0]["reader"] == "answer" and claim["witness"][0]["source"] == "secret"


def test_off_by_one_classifier_refuted_at_segment_boundary_and_replayed(compiled):
    # the policy's own rules with the causal restriction swapped for the buggy one
    bad = [
        dataclasses.replace(r, restrict=tuple(OffByOneCausal() if isinstance(p, Causal) else p for p in r.restrict))
        for r in rules_for(compiled, 0)
    ]
    claim = prove_tiles_sound(compiled, **SCOPE, rules=bad, whole_tiles=True)
    assert claim["status"] == "REFUTED", claim
    w = claim["witness"][0]
    assert w["kind"] == "FULL" and not w["pair_allowed"]
    # lengths are whole tiles, so the mislabelled tile must straddle a segment boundary
    tile_start = w["query_tile"] * 64
    starts = [s["start"] for s in w["segments"]]
    assert any(tile_start < b < tile_start + 64 for b in starts), w
    # replay on real tensors: the buggy classifier really labels that tile FULL over a forbidden pair
    layout, bm, check = replay_witness(w, compiled, rules=bad)
    assert bm.kinds[0, 0, w["query_tile"], w["key_tile"]] == FULL
    assert dg.patterns.dense_mask(layout, compiled, 0)[0, w["query"], w["key"]].item() is False
    assert check["status"] == "REFUTED" and check["details"]["full_violations"] >= 1
    # the correct classifier on the same layout is clean
    assert check_blockmap(build_blockmap(layout, compiled, 0, block_q=64, block_k=64), compiled)["status"] == "PROVED"
    # without the whole-tile restriction the bug is refuted too (possibly at the ragged end)
    assert prove_tiles_sound(compiled, **SCOPE, rules=bad)["status"] == "REFUTED"


def test_unknown_never_passes(compiled):
    claim = prove_tiles_sound(compiled, block_q=64, max_len=1 << 20, max_segments=6, timeout_ms=1)
    assert claim["status"] == "UNKNOWN" and claim["reason"]


def test_exhaustive_checker_catches_a_tampered_table(compiled):
    ids = torch.tensor([[0] * 70 + [2] * 90 + [1] * 100 + [3] * 60])
    layout = dg.Layout.from_ids(compiled, ids, end_with_generation=True)
    bm = build_blockmap(layout, compiled, 0, block_q=32, block_k=32)
    assert check_blockmap(bm, compiled)["status"] == "PROVED"
    kinds = bm.kinds.clone()
    empty = (kinds == EMPTY).nonzero()[0]
    kinds[tuple(empty)] = FULL  # claims a tile of forbidden pairs is all allowed
    claim = check_blockmap(dataclasses.replace(bm, kinds=kinds), compiled)
    assert claim["status"] == "REFUTED" and claim["witness"][0]["kind"] == "FULL"
    # Merged over layers (as certificates carry it), one bad layer refutes the whole claim and is named.
    good = [check_blockmap(build_blockmap(layout, compiled, layer, block_q=32, block_k=32), compiled)
            for layer in range(compiled.num_layers)]
    merged = _merge_layers(good, "t")
    assert merged["status"] == "PROVED" and merged["scope"]["layers"] == list(range(compiled.num_layers))
    bad = dict(claim, scope={**claim["scope"], "layer": 1})
    merged = _merge_layers([good[0], bad] + good[2:], "t")
    assert merged["status"] == "REFUTED" and merged["witness"][0]["layer"] == 1
    assert merged["details"]["full_violations"] == claim["details"]["full_violations"]


@st.composite
def layouts(draw):
    n_seg = draw(st.integers(1, 6))
    ids = []
    for _ in range(n_seg):
        ids += [draw(st.integers(0, 3))] * draw(st.integers(1, 90))
    ids += [4] * draw(st.integers(0, 20))  # trailing padding
    return ids, draw(st.sampled_from([(16, 16), (32, 16), (64, 64), (16, 48)]))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_classifier_against_dense_on_generated_layouts(compiled, case):
    ids, (bq, bk) = case
    layout = dg.Layout.from_ids(compiled, torch.tensor([ids]))
    bm = build_blockmap(layout, compiled, 0, block_q=bq, block_k=bk)
    claim = check_blockmap(bm, compiled)
    assert claim["status"] == "PROVED", claim["witness"]
    for q_len in (1, max(1, len(ids) // 3)):
        bm = build_blockmap(layout, compiled, 0, block_q=bq, block_k=bk, q_slice=q_len)
        assert check_blockmap(bm, compiled)["status"] == "PROVED"
