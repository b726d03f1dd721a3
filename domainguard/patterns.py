"""Sparsity patterns as small mask factories, each with its dense predicate and its tile rules.

Semantics (DESIGN §2 "Patterns"; every predicate reads per-token attributes only — domain,
sequence index ``i``, domain rank — so any token order gives the same mask):

* A domain's queries use ``compiled.pattern(domain, layer, head)``. The final mask is
  ``relation[d_q, d_k] AND pattern(q, k)``: a pattern can only remove pairs.
* ``causal`` restricts: ``i_k <= i_q``.
* The other parts form a UNION (a pair is kept if any part keeps it); a pattern with no
  union part keeps every pair ``causal`` keeps; no pattern at all (None) keeps every pair.
  With Δ = i_q − i_k:

  - ``window: W`` (``dilation: δ``, default 1): ``|Δ| < W·δ`` and ``Δ ≡ 0 (mod δ)``
    (W tokens on each side, the token itself included; with causal, the last W tokens).
    ``dilation`` without ``window`` is the unbounded dilated pattern ``Δ ≡ 0 (mod δ)``.
  - ``stride: S``: ``Δ ≡ 0 (mod S)`` (Sparse-Transformer strided attention).
  - ``block_local: L``: ``i_q // L == i_k // L``.
  - ``global_tokens: G``: the first G tokens of every domain are hubs (Longformer): kept
    when ``rank_q < G`` or ``rank_k < G``. The relation still applies, so a hub never
    crosses a forbidden pair.
  - ``random: {links: n, seed: s}``: BigBird-style long-range links; query i links to the n
    keys ``h(s, i, j) mod (i + 1)``, j < n (``h`` = ``link_hash``). Links point backwards so
    they never change as a sequence grows (decode and the KV cache stay consistent).

Every part is written once against a tiny ``ops`` interface, so the same code runs on
torch tensors (dense reference, tile tables) and on Z3 terms (validate.py proves the tile
rules against the dense predicate). Each part gives:

* ``mask(ops, q, k)`` — the exact predicate on token attributes (broadcasting);
* ``tile_any(ops, q, k, causal)`` — over-approximation: False ⇒ no kept pair between a query
  set and a key set summarised by ``Span``s (index and rank ranges);
* ``tile_all(ops, q, k)`` — under-approximation: True ⇒ every pair is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .layout import Layout, TokenAttrs, query_columns


# --- the ops interface (torch backend; validate.py supplies the Z3 one) ---------------------


class TorchOps:
    """Elementwise booleans and integer arithmetic on broadcasting torch tensors."""

    name = "torch"

    @staticmethod
    def and_(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = out & x
        return out

    @staticmethod
    def or_(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = out | x
        return out

    @staticmethod
    def not_(x):
        return ~x

    @staticmethod
    def const(value: bool, like):
        return torch.full_like(like, value, dtype=torch.bool)

    @staticmethod
    def min(a, b):
        return a.clamp(max=b) if isinstance(b, int) else torch.minimum(a, b)

    @staticmethod
    def max(a, b):
        return a.clamp(min=b) if isinstance(b, int) else torch.maximum(a, b)

    @staticmethod
    def fdiv(a, n: int):
        return torch.div(a, n, rounding_mode="floor")

    @staticmethod
    def mod(a, n: int):
        return torch.remainder(a, n)

    @staticmethod
    def linked(part: "RandomLinks", qi, ki):
        """True where key index ``ki`` is one of query index ``qi``'s random links."""
        out = None
        for j in range(part.links):
            hit = ki == link_hash(part.seed, qi, j) % (qi.clamp_min(0) + 1)
            out = hit if out is None else out | hit
        return out


TORCH = TorchOps()
_M31 = (1 << 31) - 1


def link_seed_term(seed: int) -> int:
    """The seed's term of ``link_hash`` (the kernels take it precomputed, as a constant)."""
    return ((seed & _M31) * 0x297A2D39) % (1 << 31)


def link_hash(seed: int, qi: torch.Tensor, j: int) -> torch.Tensor:
    """A 31-bit integer hash of (seed, query index, link number); no int64 overflow on any backend."""
    x = (qi.clamp_min(0) & _M31) * 0x2C1B3C6D % (1 << 31)
    x = (x + link_seed_term(seed) + j * 0x6C8E9CF5 % (1 << 31)) & _M31
    for mult in (0x7FEB352D, 0x4695AF5B):
        x = ((x ^ (x >> 15)) * mult) & _M31
    return x ^ (x >> 16)


class Span(NamedTuple):
    """Summary of a token set: index range [lo, hi] and rank range [rlo, rhi]."""

    lo: object
    hi: object
    rlo: object
    rhi: object


# --- parts (leaf to root) -----------------------------------------------------------------


def _has_multiple(ops, lo, hi, n: int):
    """Some multiple of n lies in [lo, hi]."""
    if n == 1:
        return lo <= hi
    return ops.fdiv(hi, n) * n >= lo


@dataclass(frozen=True)
class Causal:
    """Restriction: key index <= query index."""

    def mask(self, ops, q: TokenAttrs, k: TokenAttrs):
        return k.index <= q.index

    def tile_any(self, ops, q: Span, k: Span, causal: bool):
        return k.lo <= q.hi

    def tile_all(self, ops, q: Span, k: Span):
        return k.hi <= q.lo


@dataclass(frozen=True)
class Window:
    """|Δ| < width·dilation and Δ ≡ 0 mod dilation; width None = unbounded (pure dilation)."""

    width: int | None
    dilation: int = 1

    def mask(self, ops, q, k):
        d = q.index - k.index
        conds = []
        if self.width is not None:
            reach = self.width * self.dilation
            conds += [d < reach, -d < reach]
        if self.dilation > 1:
            conds.append(ops.mod(d, self.dilation) == 0)
        return ops.and_(*conds) if conds else ops.const(True, d)

    def tile_any(self, ops, q, k, causal):
        lo, hi = q.lo - k.hi, q.hi - k.lo  # range of Δ over the two spans
        if self.width is not None:
            reach = self.width * self.dilation - 1
            hi = ops.min(hi, reach)
            lo = ops.max(lo, 0 if causal else -reach)
        elif causal:
            lo = ops.max(lo, 0)
        return _has_multiple(ops, lo, hi, self.dilation)

    def tile_all(self, ops, q, k):
        lo, hi = q.lo - k.hi, q.hi - k.lo
        conds = []
        if self.width is not None:
            reach = self.width * self.dilation
            conds += [hi < reach, -lo < reach]
        if self.dilation > 1:
            conds += [lo == hi, ops.mod(lo, self.dilation) == 0]
        return ops.and_(*conds) if conds else ops.const(True, lo)


@dataclass(frozen=True)
class Strided:
    """Δ ≡ 0 mod stride."""

    stride: int

    def mask(self, ops, q, k):
        return ops.mod(q.index - k.index, self.stride) == 0

    def tile_any(self, ops, q, k, causal):
        lo, hi = q.lo - k.hi, q.hi - k.lo
        if causal:
            lo = ops.max(lo, 0)
        return _has_multiple(ops, lo, hi, self.stride)

    def tile_all(self, ops, q, k):
        lo, hi = q.lo - k.hi, q.hi - k.lo
        if self.stride == 1:
            return lo <= hi
        return ops.and_(lo == hi, ops.mod(lo, self.stride) == 0)


@dataclass(frozen=True)
class BlockLocal:
    """Query and key in the same block of ``size`` sequence indices."""

    size: int

    def mask(self, ops, q, k):
        return ops.fdiv(q.index, self.size) == ops.fdiv(k.index, self.size)

    def tile_any(self, ops, q, k, causal):
        n = self.size
        conds = [ops.fdiv(q.lo, n) <= ops.fdiv(k.hi, n), ops.fdiv(k.lo, n) <= ops.fdiv(q.hi, n)]
        if causal:
            conds.append(k.lo <= q.hi)
        return ops.and_(*conds)

    def tile_all(self, ops, q, k):
        n = self.size
        b = ops.fdiv(q.lo, n)
        return ops.and_(b == ops.fdiv(q.hi, n), b == ops.fdiv(k.lo, n), b == ops.fdiv(k.hi, n))


@dataclass(frozen=True)
class GlobalTokens:
    """Hubs: the first ``count`` tokens of each domain attend and are attended (within the relation)."""

    count: int

    def mask(self, ops, q, k):
        return ops.or_(q.rank < self.count, k.rank < self.count)

    def tile_any(self, ops, q, k, causal):
        hub = ops.or_(q.rlo < self.count, k.rlo < self.count)
        return ops.and_(hub, k.lo <= q.hi) if causal else hub

    def tile_all(self, ops, q, k):
        return ops.or_(q.rhi < self.count, k.rhi < self.count)


@dataclass(frozen=True)
class RandomLinks:
    """Seeded backward links (see module docstring). Tiles are marked from the links themselves."""

    links: int
    seed: int

    def mask(self, ops, q, k):
        return ops.linked(self, q.index, k.index)

    def tile_any(self, ops, q, k, causal):
        # INVARIANT: the tile builder marks every tile holding a kept link separately
        # (blockmap._random_hits); spans cannot see individual links.
        return ops.const(False, q.lo)

    def tile_all(self, ops, q, k):
        return ops.const(False, q.lo)


# --- factories -----------------------------------------------------------------------------


def causal() -> Causal:
    return Causal()


def sliding_window(width: int, dilation: int = 1) -> Window:
    return Window(width, dilation)


def dilated(dilation: int, width: int | None = None) -> Window:
    return Window(width, dilation)


def strided(stride: int) -> Strided:
    return Strided(stride)


def block_local(size: int) -> BlockLocal:
    return BlockLocal(size)


def global_tokens(count: int) -> GlobalTokens:
    return GlobalTokens(count)


def random_links(links: int, seed: int = 0) -> RandomLinks:
    return RandomLinks(links, seed)


# --- a whole pattern -----------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRule:
    """restrict[0] AND ... AND (union[0] OR union[1] ...); ``dense=True`` (no pattern) keeps every pair."""

    restrict: tuple = ()
    union: tuple = ()
    dense: bool = False

    @property
    def causal(self) -> bool:
        return any(isinstance(p, Causal) for p in self.restrict)

    @property
    def needs_rank(self) -> bool:
        return any(isinstance(p, GlobalTokens) for p in self.union)

    @property
    def random_parts(self) -> tuple:
        return tuple(p for p in self.union if isinstance(p, RandomLinks))

    def mask(self, ops, q: TokenAttrs, k: TokenAttrs):
        conds = [p.mask(ops, q, k) for p in self.restrict]
        if self.union and not self.dense:
            conds.append(ops.or_(*[p.mask(ops, q, k) for p in self.union]))
        return ops.and_(*conds) if conds else ops.const(True, q.index - k.index)

    def tile_any(self, ops, q: Span, k: Span):
        causal_ = self.causal
        conds = [p.tile_any(ops, q, k, causal_) for p in self.restrict]
        if self.union and not self.dense:
            conds.append(ops.or_(*[p.tile_any(ops, q, k, causal_) for p in self.union]))
        return ops.and_(*conds) if conds else ops.const(True, q.lo - k.lo)

    def tile_all(self, ops, q: Span, k: Span):
        conds = [p.tile_all(ops, q, k) for p in self.restrict]
        if self.union and not self.dense:
            conds.append(ops.or_(*[p.tile_all(ops, q, k) for p in self.union]))
        return ops.and_(*conds) if conds else ops.const(True, q.lo - k.lo)


DENSE = MaskRule(dense=True)


def rule_for(pattern) -> MaskRule:
    """The MaskRule of a ``domainguard.policy.Pattern`` (None → every pair)."""
    if pattern is None:
        return DENSE
    restrict = (Causal(),) if pattern.causal else ()
    union = []
    if pattern.window is not None or pattern.dilation is not None:
        union.append(Window(pattern.window, pattern.dilation or 1))
    if pattern.stride is not None:
        union.append(Strided(pattern.stride))
    if pattern.block_local is not None:
        union.append(BlockLocal(pattern.block_local))
    if pattern.global_tokens is not None:
        union.append(GlobalTokens(pattern.global_tokens))
    if pattern.random is not None:
        union.append(RandomLinks(pattern.random.links, pattern.random.seed))
    return MaskRule(restrict=restrict, union=tuple(union))


def rules_for(compiled, layer: int, head: int = 0) -> tuple[MaskRule, ...]:
    """One MaskRule per real domain id (queries of that domain) at ``layer``/``head``."""
    return tuple(rule_for(compiled.pattern(d, layer, head)) for d in range(compiled.num_domains))


def representative_heads(compiled) -> tuple[int, ...]:
    """Heads that between them show every per-head pattern choice of the policy (0 if none is per-head)."""
    policy = getattr(compiled, "policy", None)
    heads = {0}
    if policy is None:
        return (0,)
    from .policy import parse_layer_range

    for value in policy.patterns.values():
        for pat in value if isinstance(value, list) else [value]:
            if pat.heads is not None:
                rng = parse_layer_range(pat.heads, 1 << 30)
                heads.update({rng.start, rng.stop})
    return tuple(sorted(h for h in heads if h < (1 << 30)))


def group_domains(rules: Sequence[MaskRule]) -> dict[MaskRule, list[int]]:
    """Domains grouped by identical rule, in first-seen order."""
    groups: dict[MaskRule, list[int]] = {}
    for d, rule in enumerate(rules):
        groups.setdefault(rule, []).append(d)
    return groups


# --- dense reference -----------------------------------------------------------------------


def pair_mask(ops, rel_of, in_group, rules: Sequence[MaskRule], q: TokenAttrs, k: TokenAttrs):
    """relation(d_q, d_k) AND the query domain's rule — written once for every backend.

    ``rel_of(dq, dk)`` looks the relation up; ``in_group(dq, doms)`` tests membership.
    """
    terms = [ops.and_(in_group(q.domain, doms), rule.mask(ops, q, k)) for rule, doms in group_domains(rules).items()]
    return ops.and_(rel_of(q.domain, k.domain), ops.or_(*terms))


def token_mask(q: TokenAttrs, k: TokenAttrs, relation: torch.Tensor, rules: Sequence[MaskRule]) -> torch.Tensor:
    """bool [..., Nq, Nk]: may query q attend key k. ``q``/``k`` fields are [..., Nq] / [..., Nk] in any order.

    ``relation`` is [D+1, D+1] with the pad row/column False; ``rules[d]`` is the rule of
    queries of real domain d. O(Nq·Nk): this is the reference, not a fast path.
    """
    rel = relation.to(q.domain.device)
    qb = TokenAttrs(*(t.unsqueeze(-1) for t in q))  # [..., Nq, 1]
    kb = TokenAttrs(*(t.unsqueeze(-2) for t in k))  # [..., 1, Nk]
    return pair_mask(TORCH, lambda a, b: rel[a, b], _torch_in_group, rules, qb, kb)


def _torch_in_group(dom: torch.Tensor, doms: list[int]) -> torch.Tensor:
    out = dom == doms[0]
    for d in doms[1:]:
        out = out | (dom == d)
    return out


def dense_mask(layout: Layout, compiled, layer: int, head: int = 0, *, q_slice=None) -> torch.Tensor:
    """bool [B, Nq, Nk]: the ground-truth mask of ``layer``/``head`` (Nq = N, or the queries in ``q_slice``)."""
    relation = compiled.relation(layer)
    return token_mask(layout.attrs(q_slice), layout.attrs(), relation, rules_for(compiled, layer, head))


__all__ = [
    "TORCH",
    "Span",
    "Causal",
    "Window",
    "Strided",
    "BlockLocal",
    "GlobalTokens",
    "RandomLinks",
    "MaskRule",
    "DENSE",
    "causal",
    "sliding_window",
    "dilated",
    "strided",
    "block_local",
    "global_tokens",
    "random_links",
    "rule_for",
    "rules_for",
    "representative_heads",
    "link_hash",
    "pair_mask",
    "token_mask",
    "dense_mask",
    "query_columns",
]
