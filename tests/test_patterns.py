"""Pattern factories: dense predicates against plain-Python definitions, tile rules by hypothesis."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import domainguard as dg
from domainguard.layout import TokenAttrs
from domainguard.patterns import (
    TORCH,
    MaskRule,
    Span,
    block_local,
    causal,
    dense_mask,
    dilated,
    global_tokens,
    link_hash,
    random_links,
    sliding_window,
    strided,
)

# Plain-Python statements of the documented semantics (module docstring of patterns.py).
SPEC = {
    "causal": (causal(), lambda qi, ki, qr, kr: ki <= qi),
    "window": (sliding_window(5), lambda qi, ki, qr, kr: abs(qi - ki) < 5),
    "dilated-window": (sliding_window(4, 3), lambda qi, ki, qr, kr: abs(qi - ki) < 12 and (qi - ki) % 3 == 0),
    "dilated": (dilated(4), lambda qi, ki, qr, kr: (qi - ki) % 4 == 0),
    "strided": (strided(7), lambda qi, ki, qr, kr: (qi - ki) % 7 == 0),
    "block-local": (block_local(8), lambda qi, ki, qr, kr: qi // 8 == ki // 8),
    "global": (global_tokens(2), lambda qi, ki, qr, kr: qr < 2 or kr < 2),
}


def attrs(n, ranks=None):
    idx = torch.arange(n)
    rank = torch.tensor(ranks) if ranks is not None else idx % 5
    return TokenAttrs(torch.zeros(n, dtype=torch.long), idx, rank)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_part_mask_matches_definition(name):
    part, spec = SPEC[name]
    n = 41
    a = attrs(n)
    got = part.mask(TORCH, TokenAttrs(*(t[:, None] for t in a)), TokenAttrs(*(t[None, :] for t in a)))
    want = torch.tensor([[spec(i, j, i % 5, j % 5) for j in range(n)] for i in range(n)])
    assert torch.equal(got, want)


def test_random_links_point_backwards_and_are_stable():
    part = random_links(3, seed=11)
    a = attrs(200)
    m = part.mask(TORCH, TokenAttrs(*(t[:, None] for t in a)), TokenAttrs(*(t[None, :] for t in a)))
    assert not m.triu(1).any()  # only keys at or before the query
    assert (m.sum(1) >= 1).all() and (m.sum(1) <= 3).all()
    # a prefix's links do not change when the sequence grows
    short = attrs(50)
    m50 = part.mask(TORCH, TokenAttrs(*(t[:, None] for t in short)), TokenAttrs(*(t[None, :] for t in short)))
    assert torch.equal(m50, m[:50, :50])
    assert not torch.equal(m, random_links(3, seed=12).mask(TORCH, TokenAttrs(*(t[:, None] for t in a)), TokenAttrs(*(t[None, :] for t in a))))
    assert link_hash(0, torch.tensor([2**40]), 0).item() >= 0


def test_rule_semantics_causal_restricts_union_ors():
    rule = MaskRule(restrict=(causal(),), union=(sliding_window(3), global_tokens(1)))
    a = attrs(20, ranks=list(range(20)))
    m = rule.mask(TORCH, TokenAttrs(*(t[:, None] for t in a)), TokenAttrs(*(t[None, :] for t in a)))
    want = torch.tensor([[j <= i and (i - j < 3 or i < 1 or j < 1) for j in range(20)] for i in range(20)])
    assert torch.equal(m, want)
    only_causal = MaskRule(restrict=(causal(),))
    m2 = only_causal.mask(TORCH, TokenAttrs(*(t[:, None] for t in a)), TokenAttrs(*(t[None, :] for t in a)))
    assert torch.equal(m2, torch.ones(20, 20, dtype=torch.bool).tril())


POLICY = """
domainguard: 1
name: patterns-test
domains: {sys: {}, secret: {}, user: {}, answer: {}}
reads:
  user: [sys]
  answer: [sys, user]
patterns:
  default: {causal: true}
  answer: {causal: true, window: 2, global_tokens: 2}
generation: {domain: answer}
"""


def test_global_hubs_never_cross_a_forbidden_pair():
    c = dg.compile(dg.loads_policy(POLICY), layers=1)
    ids = [c.id_of(n) for n in ["secret"] * 4 + ["sys"] * 3 + ["user"] * 3 + ["answer"] * 5]
    lay = dg.Layout.from_ids(c, [ids])
    m = dense_mask(lay, c, 0)[0]
    secret = torch.tensor(ids) == c.id_of("secret")
    answer = torch.tensor(ids) == c.id_of("answer")
    assert not m[answer][:, secret].any()  # secret's first tokens are hubs, but answer may not read secret
    sys_hubs = torch.tensor([4, 5])  # first two sys tokens: hubs for answer queries
    assert m[answer][:, sys_hubs].all()
    assert m[answer][:2, 6].all()  # answer's own hubs (first two answer tokens) read all they may
    assert not m[answer][2:, 6].any()  # third sys token: not a hub, outside the other queries' window
    assert not m[secret][:, ~secret].any()


# --- tile rules: hypothesis over spans and the token sets inside them -------------------------

PARTS = [causal(), sliding_window(3), sliding_window(2, 3), dilated(2), strided(3), block_local(4), global_tokens(2)]


def token_set(draw, lo_max=40):
    lo = draw(st.integers(0, lo_max))
    idx = sorted(set(draw(st.lists(st.integers(lo, lo + 12), min_size=1, max_size=6))))
    rank = [draw(st.integers(0, 6)) for _ in idx]
    return idx, rank


@st.composite
def case(draw):
    part = draw(st.sampled_from(PARTS))
    is_causal = draw(st.booleans())
    return part, is_causal, token_set(draw), token_set(draw)


@settings(max_examples=400, deadline=None)
@given(case())
def test_tile_rules_bound_the_pairs(c):
    part, is_causal, (qi, qr), (ki, kr) = c
    rule = MaskRule(restrict=(causal(),) if is_causal else (), union=(part,) if not isinstance(part, type(causal())) else ())
    q = TokenAttrs(torch.zeros(len(qi), 1, dtype=torch.long), torch.tensor(qi)[:, None], torch.tensor(qr)[:, None])
    k = TokenAttrs(torch.zeros(1, len(ki), dtype=torch.long), torch.tensor(ki)[None, :], torch.tensor(kr)[None, :])
    pairs = rule.mask(TORCH, q, k)
    span = lambda i, r: Span(torch.tensor(min(i)), torch.tensor(max(i)), torch.tensor(min(r)), torch.tensor(max(r)))  # noqa: E731
    qs, ks = span(qi, qr), span(ki, kr)
    if pairs.any():
        assert bool(rule.tile_any(TORCH, qs, ks)), (rule, qi, ki)
    if bool(rule.tile_all(TORCH, qs, ks)):
        assert pairs.all(), (rule, qi, ki)
