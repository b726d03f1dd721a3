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
Two builders give identical tables: torch ops (any device) and three fused Triton kernels
(CUDA; ``backend="auto"`` picks them there), which run the same rules (see _SrcOps).
The ragged last tile (N not a multiple of the block size) is classified over the tokens
that exist; kernels bound-check it as always.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Sequence

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


def _cached(compiled, key, make):
    """``make()`` cached per policy object under ``key`` (policies are frozen; no cache if not weak-referenceable)."""
    try:
        per = _REL_CACHE.setdefault(compiled, {})
    except TypeError:
        return make()
    got = per.get(key)
    if got is None:
        got = per[key] = make()
    return got


def _relation_on(compiled, layer: int, device: torch.device) -> torch.Tensor:
    """``compiled.relation(layer)`` on ``device``, cached per policy object (no host copy per build)."""
    return _cached(compiled, ("relation", layer, str(device)), lambda: compiled.relation(layer).to(device))


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


# --- fused path: three Triton kernels (CUDA, or TRITON_INTERPRET=1) --------------------------
#
# The same summaries, rules and tables as the torch path above, in three launches instead of
# ~55: (1) per-tile summaries, with domain sets as int64 bitmasks (D+1 <= 64); (2) one program
# per (query tile, row) classifying every key tile; (3) the index lists. The tile rules are not
# rewritten for the kernel: each MaskRule's own tile_any/tile_all (the code validate.py proves
# with Z3) is evaluated once on symbolic operands (_SrcOps) to emit the Triton expression that
# kernel (2) runs, so the three backends (torch, Z3, Triton) share one definition of the rules.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA builds
    triton = None

_MAX_BITS = 64  # domain sets are int64 bitmasks over ids 0..D (pads included)
_INT32 = 1 << 31


class _Src:
    """A Triton source expression; Python operators build bigger expressions (for the tile rules)."""

    __slots__ = ("text",)
    __hash__ = None

    def __init__(self, text: str):
        self.text = text

    def __bool__(self):
        raise TypeError("a tile rule branched on a symbolic value")

    def _bin(op, flip=False):
        def f(a, b):
            x, y = (_src(b), a.text) if flip else (a.text, _src(b))
            return _Src(f"({x} {op} {y})")

        return f

    __add__, __sub__, __mul__ = _bin("+"), _bin("-"), _bin("*")
    __radd__, __rsub__, __rmul__ = _bin("+", True), _bin("-", True), _bin("*", True)
    __lt__, __le__, __gt__, __ge__ = _bin("<"), _bin("<="), _bin(">"), _bin(">=")
    __eq__, __ne__ = _bin("=="), _bin("!=")
    __and__, __or__ = _bin("&"), _bin("|")
    del _bin

    def __neg__(self):
        return _Src(f"(-{self.text})")


def _src(x) -> str:
    if isinstance(x, _Src):
        return x.text
    if isinstance(x, int) and not isinstance(x, bool) and -_INT32 < x < _INT32:
        return str(x)  # int32 constants only: the torch path computes in int32
    raise TypeError(f"no Triton form for {x!r}")


def _positive(n) -> int:
    if isinstance(n, int) and not isinstance(n, bool) and 0 < n < _INT32:
        return n
    raise TypeError(f"divisor {n!r} is not a positive int32")


def _call(fn: str, second) -> staticmethod:
    """An ops method ``(a, b) -> fn(a, b)`` over source text, ``second`` checking b."""
    return staticmethod(lambda a, b: _Src(f"{fn}({_src(a)}, {second(b)})"))


class _SrcOps:
    """The patterns ``ops`` interface over Triton source text (floor division as in torch)."""

    name = "triton"

    @staticmethod
    def and_(*xs):
        return _Src("(" + " & ".join(_src(x) for x in xs) + ")")

    @staticmethod
    def or_(*xs):
        return _Src("(" + " | ".join(_src(x) for x in xs) + ")")

    @staticmethod
    def not_(x):
        return _Src(f"({_src(x)} == 0)")

    @staticmethod
    def const(value: bool, like):
        return _Src(f"({_src(like)} {'==' if value else '!='} {_src(like)})")

    min = _call("tl.minimum", _src)
    max = _call("tl.maximum", _src)
    fdiv = _call("_dg_fdiv", _positive)
    mod = _call("_dg_mod", _positive)

    @staticmethod
    def linked(part, qi, ki):
        raise TypeError("random links are marked from the links themselves, not by a span rule")


_KERNEL_HEAD = '''"""Generated by domainguard.blockmap from a tuple of MaskRules; do not edit."""
import triton
import triton.language as tl


@triton.jit
def _dg_mod(a, n: tl.constexpr):
    r = a % n
    return tl.where(r < 0, r + n, r)


@triton.jit
def _dg_fdiv(a, n: tl.constexpr):
    return (a - _dg_mod(a, n)) // n


@triton.jit
def {name}(
    qp_ptr, qf_ptr, qlo_ptr, qhi_ptr, qrlo_ptr, qrhi_ptr,
    kp_ptr, kh_ptr, alo_ptr, ahi_ptr, arlo_ptr, kalo_ptr, kahi_ptr, karlo_ptr, karhi_ptr,
    group_ptr, out_ptr, out_stride_b, Tq, Tk, D, BK: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    qrow = b * Tq + i
    qp = tl.load(qp_ptr + qrow)
    qf = tl.load(qf_ptr + qrow)
    for j0 in range(0, Tk, BK):
        j = j0 + tl.arange(0, BK)
        jm = j < Tk
        krow = b * Tk + j
        kp = tl.load(kp_ptr + krow, mask=jm, other=0)
        kh = tl.load(kh_ptr + krow, mask=jm, other=0)
        kalo = tl.load(kalo_ptr + krow, mask=jm, other=0)
        kahi = tl.load(kahi_ptr + krow, mask=jm, other=0)
{kall_rank}        all_ = (qf & kp) == 0
        any_ = j < 0
        for r in range(0, D):
            if ((qp >> r) & 1) != 0:
                g = tl.load(group_ptr + r)
                khas = ((kh >> r) & 1) != 0
                qlo = tl.load(qlo_ptr + qrow * D + r)
                qhi = tl.load(qhi_ptr + qrow * D + r)
                klo = tl.load(alo_ptr + krow * D + r, mask=jm, other=0)
                khi = tl.load(ahi_ptr + krow * D + r, mask=jm, other=0)
{span_rank}{groups}        kind = tl.where(all_, {full}, tl.where(any_, {partial}, {empty}))
        tl.store(out_ptr + b * out_stride_b + i * Tk + j, kind.to(tl.uint8), mask=jm)
'''
_KALL_RANK = """        karlo = tl.load(karlo_ptr + krow, mask=jm, other=0)
        karhi = tl.load(karhi_ptr + krow, mask=jm, other=0)
"""
_SPAN_RANK = """                qrlo = tl.load(qrlo_ptr + qrow * D + r)
                qrhi = tl.load(qrhi_ptr + qrow * D + r)
                krlo = tl.load(arlo_ptr + krow * D + r, mask=jm, other=0)
"""


def _kernel_source(rules: tuple, name: str) -> str:
    """Source of the classification kernel for ``rules`` (TypeError where a rule has no Triton form)."""
    need_rank = any(r.needs_rank for r in rules)
    qspan = Span(_Src("qlo"), _Src("qhi"), _Src("qrlo") if need_rank else None, _Src("qrhi") if need_rank else None)
    kspan = Span(_Src("klo"), _Src("khi"), _Src("krlo") if need_rank else None, None)
    kall = Span(_Src("kalo"), _Src("kahi"), _Src("karlo") if need_rank else None, _Src("karhi") if need_rank else None)
    ops = _SrcOps()
    body = []
    for gid, rule in enumerate(group_domains(rules)):
        pad = " " * 16
        body.append(f"{pad}if g == {gid}:\n")
        if rule.dense:
            body.append(f"{pad}    any_ = any_ | khas\n")
            continue
        body.append(f"{pad}    any_ = any_ | (khas & {_src(rule.tile_any(ops, qspan, kspan))})\n")
        body.append(f"{pad}    all_ = all_ & {_src(rule.tile_all(ops, qspan, kall))}\n")
    return _KERNEL_HEAD.format(
        name=name,
        kall_rank=_KALL_RANK if need_rank else "",
        span_rank=_SPAN_RANK if need_rank else "",
        groups="".join(body),
        full=FULL,
        partial=PARTIAL,
        empty=EMPTY,
    )


_KERNELS: dict = {}  # rules tuple -> generated kernel, or the TypeError saying why there is none


def _kernel_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "domainguard", "tile_kernels")
    try:
        os.makedirs(path, exist_ok=True)
        return path
    except OSError:
        path = os.path.join(tempfile.gettempdir(), f"domainguard-tile-kernels-{os.getuid()}")
        os.makedirs(path, exist_ok=True)
        return path


def _classify_kernel(rules: tuple):
    """The generated classification kernel of ``rules`` (cached; Triton needs its source in a file)."""
    got = _KERNELS.get(rules)
    if got is None:
        try:
            probe = _kernel_source(rules, "KERNEL")
            name = "dg_classify_" + hashlib.sha256(probe.encode()).hexdigest()[:16]
            text = _kernel_source(rules, name)
            path = os.path.join(_kernel_dir(), name + ".py")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".py")
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            got = getattr(module, name)
        except TypeError as e:
            got = e
        _KERNELS[rules] = got
    return got


if triton is not None:

    @triton.jit
    def _tile_summaries(
        dom_ptr, idx_ptr, rank_ptr, rel_ptr, N, T, D,
        p_ptr, f_ptr, kh_ptr, lo_ptr, hi_ptr, rlo_ptr, rhi_ptr, alo_ptr, ahi_ptr, arlo_ptr,
        kalo_ptr, kahi_ptr, karlo_ptr, karhi_ptr,
        BLOCK: tl.constexpr, BP: tl.constexpr, DP: tl.constexpr, NEED_RANK: tl.constexpr, BIG: tl.constexpr,
    ):
        """One program per (tile, row): _summarise plus the per-key-tile reductions of _classify."""
        t = tl.program_id(0)
        b = tl.program_id(1)
        lane = tl.arange(0, BP)
        offs = t * BLOCK + lane
        m = (lane < BLOCK) & (offs < N)
        dom = tl.load(dom_ptr + b * N + offs, mask=m, other=-1)
        idx = tl.load(idx_ptr + b * N + offs, mask=m, other=0).to(tl.int32)
        c = tl.arange(0, DP)
        onehot = (dom[:, None] == c[None, :]) & m[:, None] & (c < D + 1)[None, :]  # ids 0..D; pads are id D
        real = onehot & (c < D)[None, :]
        present = tl.max(onehot.to(tl.int32), axis=0) > 0
        bit = tl.full([DP], 1, tl.int64) << c.to(tl.int64)
        lo = tl.min(tl.where(real, idx[:, None], BIG), axis=0)
        hi = tl.max(tl.where(real, idx[:, None], -BIG), axis=0)
        row = (b * T + t) * D
        cm = c < D
        tl.store(lo_ptr + row + c, lo, mask=cm)
        tl.store(hi_ptr + row + c, hi, mask=cm)
        # relation rows r, columns s (pad row/column included)
        rr = tl.arange(0, DP)[:, None]
        ss = tl.arange(0, DP)[None, :]
        inside = (rr < D + 1) & (ss < D + 1)
        rel = tl.load(rel_ptr + rr * (D + 1) + ss, mask=inside, other=0) != 0
        readable = rel & (rr < D) & (ss < D)
        # key side: per query domain r, the keys r may read
        tl.store(alo_ptr + row + c, tl.min(tl.where(readable, lo[None, :], BIG), axis=1), mask=cm)
        tl.store(ahi_ptr + row + c, tl.max(tl.where(readable, hi[None, :], -BIG), axis=1), mask=cm)
        has_allowed = tl.max((readable & present[None, :]).to(tl.int32), axis=1) > 0
        tl.store(kh_ptr + b * T + t, tl.sum(tl.where(has_allowed, bit, 0), axis=0))
        # query side: key domains forbidden to some domain present here (pads included)
        forbidden = inside & (rel == 0) & present[:, None]
        fb = tl.max(forbidden.to(tl.int32), axis=0) > 0
        tl.store(f_ptr + b * T + t, tl.sum(tl.where(fb, bit, 0), axis=0))
        tl.store(p_ptr + b * T + t, tl.sum(tl.where(present, bit, 0), axis=0))
        tl.store(kalo_ptr + b * T + t, tl.min(lo, axis=0))
        tl.store(kahi_ptr + b * T + t, tl.max(hi, axis=0))
        if NEED_RANK:
            rank = tl.load(rank_ptr + b * N + offs, mask=m, other=0).to(tl.int32)
            rlo = tl.min(tl.where(real, rank[:, None], BIG), axis=0)
            rhi = tl.max(tl.where(real, rank[:, None], -BIG), axis=0)
            tl.store(rlo_ptr + row + c, rlo, mask=cm)
            tl.store(rhi_ptr + row + c, rhi, mask=cm)
            tl.store(arlo_ptr + row + c, tl.min(tl.where(readable, rlo[None, :], BIG), axis=1), mask=cm)
            tl.store(karlo_ptr + b * T + t, tl.min(rlo, axis=0))
            tl.store(karhi_ptr + b * T + t, tl.max(rhi, axis=0))

    @triton.jit
    def _tile_lists(kinds_ptr, pnum_ptr, pidx_ptr, fnum_ptr, fidx_ptr, Tk, BK: tl.constexpr, PARTIAL_: tl.constexpr, FULL_: tl.constexpr):
        """One program per table row: _flex_lists for PARTIAL and FULL (selected ascending, then the rest)."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * Tk
        zero = tl.sum(tl.zeros([BK], tl.int32), axis=0)
        n_p = zero
        n_f = zero
        for j0 in range(0, Tk, BK):
            j = j0 + tl.arange(0, BK)
            kind = tl.load(kinds_ptr + base + j, mask=j < Tk, other=255)
            n_p += tl.sum((kind == PARTIAL_).to(tl.int32), axis=0)
            n_f += tl.sum((kind == FULL_).to(tl.int32), axis=0)
        tl.store(pnum_ptr + row, n_p)
        tl.store(fnum_ptr + row, n_f)
        c_p = zero
        c_f = zero
        for j0 in range(0, Tk, BK):
            j = j0 + tl.arange(0, BK)
            jm = j < Tk
            kind = tl.load(kinds_ptr + base + j, mask=jm, other=255)
            s_p = (kind == PARTIAL_).to(tl.int32)
            s_f = (kind == FULL_).to(tl.int32)
            k_p = c_p + tl.cumsum(s_p, axis=0)  # selected up to and including j
            k_f = c_f + tl.cumsum(s_f, axis=0)
            tl.store(pidx_ptr + base + tl.where(s_p != 0, k_p - 1, n_p + j - k_p), j, mask=jm)
            tl.store(fidx_ptr + base + tl.where(s_f != 0, k_f - 1, n_f + j - k_f), j, mask=jm)
            c_p += tl.sum(s_p, axis=0)
            c_f += tl.sum(s_f, axis=0)


def _fused_usable(device: torch.device, num_domains: int, rule_rows) -> bool:
    if triton is None or num_domains + 1 > _MAX_BITS:
        return False
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return all(not isinstance(_classify_kernel(r), TypeError) for r in rule_rows)


def _fused_summaries(a: TokenAttrs, rel8: torch.Tensor, d: int, block: int, need_rank: bool) -> tuple:
    b, n = a.domain.shape
    t = max(1, -(-n // block))
    dev = a.domain.device
    spans = torch.empty(7, b, t, d, dtype=_SPAN, device=dev)  # lo hi rlo rhi | allowed lo hi rlo
    kall = torch.empty(4, b, t, dtype=_SPAN, device=dev)  # all keys: lo hi rlo rhi
    bits = torch.empty(3, b, t, dtype=torch.int64, device=dev)  # present, forbidden-to-present, has-allowed
    dom, idx, rank = (x.contiguous() for x in a)
    _tile_summaries[(t, b)](
        dom, idx, rank, rel8, n, t, d,
        bits[0], bits[1], bits[2], *spans, *kall,
        BLOCK=block, BP=triton.next_power_of_2(block), DP=max(2, triton.next_power_of_2(d + 1)), NEED_RANK=need_rank, BIG=_BIG,
    )
    return bits, spans, kall


def _fused_tables(q: TokenAttrs, k: TokenAttrs, compiled, layer: int, relation, rule_rows, block_q: int, block_k: int):
    """(kinds [B, H, Tq, Tk] uint8, partial_num, partial_idx, full_num, full_idx) through the Triton kernels."""
    d = len(rule_rows[0])
    dev = q.domain.device
    need_rank = any(r.needs_rank for rules in rule_rows for r in rules)
    rel8 = _cached(compiled, ("rel8", layer, str(dev)), lambda: relation.to(torch.int8).contiguous())
    qsum = _fused_summaries(q, rel8, d, block_q, need_rank)
    same = block_q == block_k and all(a.shape == b.shape and a.data_ptr() == b.data_ptr() for a, b in zip(q, k))
    ksum = qsum if same else _fused_summaries(k, rel8, d, block_k, need_rank)
    (qbits, qspans, _), (kbits, kspans, kall) = qsum, ksum
    bsz, tq, tk = qbits.shape[1], qbits.shape[2], kbits.shape[2]
    kinds = torch.empty(bsz, len(rule_rows), tq, tk, dtype=torch.uint8, device=dev)
    bk = min(128, max(16, triton.next_power_of_2(tk)))
    done: dict = {}
    for h, rules in enumerate(rule_rows):
        if rules in done:
            kinds[:, h] = kinds[:, done[rules]]
            continue
        done[rules] = h
        groups = _cached(compiled, ("groups", rules, str(dev)), lambda: _group_ids(rules, dev))
        out = kinds[:, h]
        _classify_kernel(rules)[(tq, bsz)](
            qbits[0], qbits[1], qspans[0], qspans[1], qspans[2], qspans[3],
            kbits[0], kbits[2], kspans[4], kspans[5], kspans[6], *kall,
            groups, out, out.stride(0), tq, tk, d, BK=bk,
        )
        hits = _random_hits(q, k, relation, rules, block_q, block_k, tq, tk)
        if hits is not None:
            out.masked_fill_(hits & (out == EMPTY), PARTIAL)
    lists = [torch.empty(bsz, len(rule_rows), tq, *shape, dtype=torch.int32, device=dev) for shape in ((), (tk,), (), (tk,))]
    _tile_lists[(bsz * len(rule_rows) * tq,)](kinds, *lists, tk, BK=bk, PARTIAL_=PARTIAL, FULL_=FULL)
    return (kinds, *lists)


def _group_ids(rules: tuple, device) -> torch.Tensor:
    """int32 [D]: the index (in group_domains order) of each domain's rule."""
    gid = {rule: g for g, rule in enumerate(group_domains(rules))}
    return torch.tensor([gid[r] for r in rules], dtype=torch.int32, device=device)


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
    backend: str = "auto",
) -> BlockMap:
    """Tile tables over tokens in any order (reordered tokens, decode): ``q``/``k`` fields [B, Nq] / [B, Nk].

    ``heads`` None builds one table shared by all heads (LayoutError DG308 if the policy has
    per-head patterns); otherwise one table per listed head. ``rules`` (one tuple of per-domain
    MaskRules per head row) overrides the policy's patterns — for validation experiments only.
    ``backend``: ``"torch"`` (vectorised torch ops, any device), ``"triton"`` (three fused
    kernels: CUDA, or the CPU under ``TRITON_INTERPRET=1``; at most 63 domains) or ``"auto"``
    (Triton on CUDA where it applies, torch elsewhere). Both give identical tables.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
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
            if _cached(compiled, "representative_heads", lambda: representative_heads(compiled)) != (0,):
                raise LayoutError(
                    "the policy has per-head patterns; pass head=... (an int or a list of heads)",
                    code="DG308",
                )
            heads_for_rules = (0,)
        else:
            heads_for_rules = tuple(heads)
        rules = [_cached(compiled, ("rules", layer, h), lambda: tuple(rules_for(compiled, layer, h))) for h in heads_for_rules]
    rules = [tuple(r) for r in rules]
    fused = backend == "triton" or (backend == "auto" and q.domain.is_cuda)
    if fused and not (q.domain.shape[0] and _fused_usable(q.domain.device, len(rules[0]), rules)):
        if backend == "triton":
            raise ValueError(
                "the Triton tile builder needs CUDA (or TRITON_INTERPRET=1 on the CPU), at most "
                f"{_MAX_BITS - 1} domains and rules with a Triton form"
            )
        fused = False
    if fused:
        kinds, partial_num, partial_idx, full_num, full_idx = _fused_tables(q, k, compiled, layer, relation, rules, block_q, block_k)
    else:
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
    backend: str = "auto",
) -> BlockMap:
    """Tile tables of ``layer`` for ``layout`` (queries: all tokens, or those in ``q_slice`` for decode)."""
    heads = None if head is None else ([head] if isinstance(head, int) else list(head))
    return build_blockmap_from_attrs(
        layout.attrs(q_slice), layout.attrs(), compiled, layer, block_q=block_q, block_k=block_k, heads=heads, backend=backend
    )


__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockMap", "build_blockmap", "build_blockmap_from_attrs"]
