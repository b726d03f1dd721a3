"""BlockMap: per-layer tile tables (EMPTY / PARTIAL / FULL) built from per-tile summaries.

A query tile × key tile is

* EMPTY   — no pair in it is allowed: the kernel never loads it;
* FULL    — every pair in it is allowed: no element mask is applied;
* PARTIAL — anything else: the kernel applies the element mask (patterns.token_mask).

Tiles are cut along the tensor's token axis, in whatever order the tokens are (the kernel
may sort tokens by domain first). The builder never materialises the Nq × Nk mask: it
summarises each tile per domain (which domains occur; index and rank range of each domain's
tokens) in O(N·D), then classifies all tiles at once with vectorised tensor ops in
O((Nq/Bq)·(Nk/Bk)·D) on the layout's device, using the tile rules of patterns.py:

    FULL  ⇐ no (query domain, key domain) pair present is forbidden (pads included)
            AND for every query domain r in the tile: rule_r.tile_all(span_r, all keys)
    EMPTY ⇐ for every query domain r: no allowed key domain present, or
            NOT rule_r.tile_any(span_r, span of keys r may read); and no random link lands in it

validate.py proves these rules sound with Z3 and re-checks concrete tables exhaustively.
The ragged last tile (N not a multiple of the block size) is classified over the tokens
that exist; kernels bound-check it as always.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import weakref

import torch

from .errors import LayoutError
from .layout import Layout, TokenAttrs
from .patterns import TORCH, MaskRule, Span, _torch_in_group, group_domains, link_hash, pair_mask, representative_heads, rules_for

EMPTY, PARTIAL, FULL = 0, 1, 2
# Spans are int32: sequence indices and ranks stay below _BIG = 2**29, so span arithmetic
# (differences of two spans, sentinels included) stays inside int32.
# INVARIANT: validate.py encodes the same sentinel; sequences are shorter than _BIG tokens.
_BIG = 1 << 29
_SPAN = torch.int32
_CHUNK_ELEMS = 1 << 23  # bound on Tq·Tk·D elements classified at once (memory, not N²)


# --- per-tile summaries ----------------------------------------------------------------------


@dataclass
class _Summary:
    present: torch.Tensor  # [B, T, D+1] bool (column D = padding)
    lo: torch.Tensor  # [B, T, D] min sequence index of domain d's tokens in the tile (+_BIG if absent)
    hi: torch.Tensor  # [B, T, D] max (-_BIG if absent)
    rlo: torch.Tensor | None  # [B, T, D] min / max domain rank, when a rule needs ranks
    rhi: torch.Tensor | None


def _summarise(attrs: TokenAttrs, num_domains: int, block: int, need_rank: bool) -> _Summary:
    """Per-tile, per-domain summaries of tokens [t·block, (t+1)·block) along the last axis. O(B·N·D)."""
    dom, idx, rank = attrs
    b, n = dom.shape
    t = max(1, -(-n // block))
    extra = t * block - n
    if extra:
        # Positions past the end belong to no domain at all (id D+1 matches no one-hot column).
        dom = torch.nn.functional.pad(dom, (0, extra), value=num_domains + 1)
        idx = torch.nn.functional.pad(idx, (0, extra))
        rank = torch.nn.functional.pad(rank, (0, extra))
    dom = dom.view(b, t, block, 1)
    classes = torch.arange(num_domains + 1, device=dom.device)
    onehot = dom == classes  # [B, T, block, D+1]
    present = onehot.any(2)
    real = onehot[..., :num_domains]
    big = torch.full((), _BIG, dtype=_SPAN, device=dom.device)
    idx = idx.to(_SPAN).view(b, t, block, 1)
    lo = torch.where(real, idx, big).amin(2)
    hi = torch.where(real, idx, -big).amax(2)
    rlo = rhi = None
    if need_rank:
        rank = rank.to(_SPAN).view(b, t, block, 1)
        rlo = torch.where(real, rank, big).amin(2)
        rhi = torch.where(real, rank, -big).amax(2)
    return _Summary(present, lo, hi, rlo, rhi)


def _masked_reduce(values: torch.Tensor, keep: torch.Tensor, fill: int, reduce: str) -> torch.Tensor:
    """[B, T, D(s)] values, [D(r), D(s)] keep → [B, T, D(r)]: reduce over the sources s each r keeps."""
    v = torch.where(keep, values.unsqueeze(-2), torch.full((), fill, dtype=values.dtype, device=values.device))
    return v.amin(-1) if reduce == "min" else v.amax(-1)


# --- classification --------------------------------------------------------------------------


def _random_hits(q: TokenAttrs, k: TokenAttrs, rel: torch.Tensor, rules, block_q, block_k, tq, tk) -> torch.Tensor | None:
    """bool [B, Tq, Tk]: tiles holding at least one allowed random link. O(Nq·links)."""
    hits = None
    groups = [(rule, doms) for rule, doms in group_domains(rules).items() if rule.random_parts]
    if not groups:
        return None
    b, nk = k.domain.shape
    dev = k.domain.device
    kvalid = k.index >= 0
    size = int(k.index.max().item()) + 1 if nk else 1
    # pos_of[b, i] = key column holding sequence index i (-1 if none); keys may be in any order.
    pos_of = torch.full((b, size + 1), -1, dtype=torch.long, device=dev)
    cols = torch.arange(nk, device=dev).expand(b, nk)
    pos_of.scatter_(1, torch.where(kvalid, k.index, size), torch.where(kvalid, cols, -1))
    pos_of = pos_of[:, :size]
    hits = torch.zeros(b, tq * tk + 1, dtype=torch.bool, device=dev)
    qcols = torch.arange(q.domain.shape[1], device=dev).expand_as(q.domain)
    for rule, doms in groups:
        member = torch.isin(q.domain, torch.tensor(doms, device=dev)) & (q.index >= 0)
        for part in rule.random_parts:
            for j in range(part.links):
                target = link_hash(part.seed, q.index, j) % (q.index.clamp_min(0) + 1)
                kcol = pos_of.gather(1, target.clamp(0, size - 1))
                ok = member & (target < size) & (kcol >= 0)
                kcol = kcol.clamp_min(0)
                kdom = k.domain.gather(1, kcol)
                ok &= rel[q.domain, kdom]
                slot = torch.where(ok, (qcols // block_q) * tk + kcol // block_k, tq * tk)
                hits.scatter_(1, slot, True)
    return hits[:, : tq * tk].view(b, tq, tk)


_REL_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _relation_on(compiled, layer: int, device: torch.device) -> torch.Tensor:
    """``compiled.relation(layer)`` on ``device``, cached per policy object (no host copy per build)."""
    try:
        per = _REL_CACHE.setdefault(compiled, {})
    except TypeError:  # not weak-referenceable: no cache
        return compiled.relation(layer).to(device)
    key = (layer, str(device))
    if key not in per:
        per[key] = compiled.relation(layer).to(device)
    return per[key]


def _classify(q: TokenAttrs, k: TokenAttrs, rel: torch.Tensor, rules: Sequence[MaskRule], block_q: int, block_k: int) -> torch.Tensor:
    """uint8 [B, Tq, Tk] tile kinds for one head."""
    d = len(rules)
    need_rank = any(r.needs_rank for r in rules)
    qs = _summarise(q, d, block_q, need_rank)
    same = block_q == block_k and all(a.shape == b.shape and a.data_ptr() == b.data_ptr() for a, b in zip(q, k))
    ks = qs if same else _summarise(k, d, block_k, need_rank)  # prefill: queries are the keys
    bsz, tq, tk = qs.present.shape[0], qs.present.shape[1], ks.present.shape[1]
    rel = rel.to(q.domain.device)
    # Forbidden (r, s) pairs present in both tiles, pads included: [B, Tq, Tk] counts.
    forbidden = (qs.present.float() @ (~rel).float()) @ ks.present.float().transpose(1, 2)
    no_forbidden = forbidden == 0
    readable = rel[:d, :d]  # [D(r), D(s)]
    # Keys each query domain r may read, per key tile: [B, Tk, D(r)].
    k_allowed = Span(
        _masked_reduce(ks.lo, readable, _BIG, "min"),
        _masked_reduce(ks.hi, readable, -_BIG, "max"),
        None if ks.rlo is None else _masked_reduce(ks.rlo, readable, _BIG, "min"),
        None,
    )
    k_has_allowed = (ks.present[..., :d].float() @ readable.float().T) > 0  # [B, Tk, D(r)]
    # All keys of the tile (any domain): [B, Tk, 1].
    k_all = Span(
        ks.lo.amin(-1, keepdim=True),
        ks.hi.amax(-1, keepdim=True),
        None if ks.rlo is None else ks.rlo.amin(-1, keepdim=True),
        None if ks.rhi is None else ks.rhi.amax(-1, keepdim=True),
    )
    q_has = qs.present[..., :d]
    groups = list(group_domains(rules).items())
    any_ = torch.zeros(bsz, tq, tk, dtype=torch.bool, device=q.domain.device)
    all_ = no_forbidden.clone()
    step = max(1, _CHUNK_ELEMS // max(1, tk * d))
    for start in range(0, tq, step):
        rows = slice(start, min(tq, start + step))
        for rule, doms in groups:
            sel = slice(doms[0], doms[-1] + 1) if doms == list(range(doms[0], doms[-1] + 1)) else torch.tensor(doms, device=q.domain.device)
            pick = lambda t: None if t is None else t[..., sel]  # noqa: E731
            qspan = Span(*(None if t is None else pick(t)[:, rows, None, :] for t in (qs.lo, qs.hi, qs.rlo, qs.rhi)))
            kspan = Span(*(None if t is None else pick(t)[:, None, :, :] for t in k_allowed))
            kall = Span(*(None if t is None else t[:, None, :, :] for t in k_all))
            has = pick(q_has)[:, rows, None, :]
            if rule.dense:
                hit = has & pick(k_has_allowed)[:, None, :, :]
                any_[:, rows] |= hit.any(-1)
                continue
            hit = has & pick(k_has_allowed)[:, None, :, :] & rule.tile_any(TORCH, qspan, kspan)
            any_[:, rows] |= hit.any(-1)
            all_[:, rows] &= (~has | rule.tile_all(TORCH, qspan, kall)).all(-1)
    hits = _random_hits(q, k, rel, rules, block_q, block_k, tq, tk)
    if hits is not None:
        any_ |= hits
    kinds = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
    return kinds.to(torch.uint8)


def _flex_lists(kinds: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention-style (num [.., Tq], idx [.., Tq, Tk]) int32 lists of tiles of ``kind``, ascending, valid first."""
    sel = kinds == kind
    num = sel.sum(-1, dtype=torch.int32)
    idx = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num, idx


# --- the artifact ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Tile tables of one layer: ``kinds`` uint8 [B, H, Tq, Tk] plus FlexAttention-style index lists."""

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    layer: int
    heads: tuple[int, ...] | None  # None: one table shared by every head
    kinds: torch.Tensor
    partial_num: torch.Tensor
    partial_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    _q: TokenAttrs = field(repr=False, default=None)
    _k: TokenAttrs = field(repr=False, default=None)
    _relation: torch.Tensor = field(repr=False, default=None)
    _rules: tuple = field(repr=False, default=())  # one rules tuple per head row

    @property
    def num_tiles(self) -> tuple[int, int]:
        return self.kinds.shape[-2], self.kinds.shape[-1]

    def tile_sizes(self) -> torch.Tensor:
        """int64 [Tq, Tk]: number of (query, key) pairs in each tile (ragged edges are smaller)."""
        tq, tk = self.num_tiles
        dev = self.kinds.device
        qn = (self.q_len - torch.arange(tq, device=dev) * self.block_q).clamp(max=self.block_q)
        kn = (self.kv_len - torch.arange(tk, device=dev) * self.block_k).clamp(max=self.block_k)
        return qn[:, None] * kn[None, :]

    def stats(self, head_dim: int = 128) -> dict:
        """Tile counts, density bounds, tile sparsity and attention FLOPs saved (QKᵀ and PV, per head)."""
        sizes = self.tile_sizes().to(torch.float64)
        total_pairs = float(self.q_len * self.kv_len) * self.kinds.shape[0] * self.kinds.shape[1]
        counts = {name: int((self.kinds == k).sum()) for name, k in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        pairs = {name: float((sizes * (self.kinds == k)).sum()) for name, k in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        flops_dense = 4.0 * total_pairs * head_dim
        flops_run = 4.0 * (pairs["partial"] + pairs["full"]) * head_dim
        total_tiles = sum(counts.values())
        return {
            "tiles": total_tiles,
            **{f"{k}_tiles": v for k, v in counts.items()},
            "tile_sparsity": counts["empty"] / total_tiles if total_tiles else 0.0,
            "density_upper": (pairs["partial"] + pairs["full"]) / total_pairs if total_pairs else 0.0,
            "density_lower": pairs["full"] / total_pairs if total_pairs else 0.0,
            "flops_dense": flops_dense,
            "flops_blocked": flops_run,
            "flops_saved": 1.0 - flops_run / flops_dense if flops_dense else 0.0,
        }

    def mask_mod(self):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` computing the exact element mask."""
        q, k, rel = self._q, self._k, self._relation.to(self._q.domain.device)
        rule_sets = self._rules

        def mask_mod(b, h, q_idx, kv_idx):
            qa = TokenAttrs(q.domain[b, q_idx], q.index[b, q_idx], q.rank[b, q_idx])
            ka = TokenAttrs(k.domain[b, kv_idx], k.index[b, kv_idx], k.rank[b, kv_idx])
            out = None
            for row, rules in enumerate(rule_sets):
                term = pair_mask(TORCH, lambda x, y: rel[x, y], _torch_in_group, rules, qa, ka)
                if len(rule_sets) > 1:
                    term = term & (h == row)
                out = term if out is None else out | term
            return out

        return mask_mod

    def to_flex_block_mask(self):
        """This map as a ``torch.nn.attention.flex_attention.BlockMask`` (for comparison and FlexAttention)."""
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask.from_kv_blocks(
            self.partial_num,
            self.partial_idx,
            self.full_num,
            self.full_idx,
            BLOCK_SIZE=(self.block_q, self.block_k),
            mask_mod=self.mask_mod(),
            seq_lengths=(self.q_len, self.kv_len),
        )


def build_blockmap_from_attrs(
    q: TokenAttrs,
    k: TokenAttrs,
    compiled,
    layer: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
    heads: Sequence[int] | None = None,
    rules: Sequence[Sequence[MaskRule]] | None = None,
) -> BlockMap:
    """Tile tables over tokens in any order (reordered tokens, decode): ``q``/``k`` fields [B, Nq] / [B, Nk].

    ``heads`` None builds one table shared by all heads (LayoutError DG308 if the policy has
    per-head patterns); otherwise one table per listed head. ``rules`` (one tuple of per-domain
    MaskRules per head row) overrides the policy's patterns — for validation experiments only.
    """
    if block_q <= 0 or block_k <= 0:
        raise LayoutError(f"block sizes must be positive, got {block_q}x{block_k}", code="DG306")
    if q.domain.dim() != 2 or k.domain.dim() != 2 or q.domain.shape[0] != k.domain.shape[0]:
        raise LayoutError(
            f"token attributes must be [B, N] with one batch size, got {tuple(q.domain.shape)} and {tuple(k.domain.shape)}",
            code="DG306",
        )
    longest = max(q.domain.shape[1], k.domain.shape[1])
    if longest >= _BIG:
        raise LayoutError(f"sequences of {longest} tokens exceed the tile builder's limit of {_BIG - 1}", code="DG306")
    relation = _relation_on(compiled, layer, q.domain.device)
    if rules is None:
        if heads is None:
            if representative_heads(compiled) != (0,):
                raise LayoutError(
                    "the policy has per-head patterns; pass head=... (an int or a list of heads)",
                    code="DG308",
                )
            rules = [rules_for(compiled, layer, 0)]
        else:
            rules = [rules_for(compiled, layer, h) for h in heads]
    rules = [tuple(r) for r in rules]
    tables = {}
    per_head = []
    for r in rules:
        if r not in tables:
            tables[r] = _classify(q, k, relation, r, block_q, block_k)
        per_head.append(tables[r])
    kinds = torch.stack(per_head, 1)  # [B, H, Tq, Tk]
    partial_num, partial_idx = _flex_lists(kinds, PARTIAL)
    full_num, full_idx = _flex_lists(kinds, FULL)
    return BlockMap(
        block_q=block_q,
        block_k=block_k,
        q_len=q.domain.shape[1],
        kv_len=k.domain.shape[1],
        layer=layer,
        heads=None if heads is None else tuple(heads),
        kinds=kinds,
        partial_num=partial_num,
        partial_idx=partial_idx,
        full_num=full_num,
        full_idx=full_idx,
        _q=q,
        _k=k,
        _relation=relation,
        _rules=tuple(rules),
    )


def build_blockmap(
    layout: Layout,
    compiled,
    layer: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
    head: int | Sequence[int] | None = None,
    q_slice=None,
) -> BlockMap:
    """Tile tables of ``layer`` for ``layout`` (queries: all tokens, or those in ``q_slice`` for decode)."""
    heads = None if head is None else ([head] if isinstance(head, int) else list(head))
    return build_blockmap_from_attrs(
        layout.attrs(q_slice), layout.attrs(), compiled, layer, block_q=block_q, block_k=block_k, heads=heads
    )


__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockMap", "build_blockmap", "build_blockmap_from_attrs"]
