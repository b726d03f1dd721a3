"""Guarded attention: the public wrappers over the frozen kernels (DESIGN §5).

``attention_reference`` is the plain-PyTorch ground truth; ``attention`` runs the
Triton kernels where they can run (a CUDA device, or ``TRITON_INTERPRET=1``) and the
reference otherwise. ``GuardedAttention`` freezes a compiled policy's relation
tables at construction; nothing passed to a call can widen what it enforces.

Semantics shared by every path (q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``):

* ``mask[b, i, j]`` = relation[d_i, d_j] AND pattern(i, j) AND both tokens valid
  (``domainguard.patterns.dense_mask``); masked scores are ``-inf`` — never a finite
  "large negative" — so a masked pair has probability exactly 0;
* a key of a domain the row may not read never has its values multiplied into the row
  (``0 * NaN`` would be NaN), so outputs are bitwise independent of forbidden domains' keys;
  keys of readable domains that causality or a pattern excludes may be, as in dense attention
  (a NaN or Inf there can reach the row; the certificate's threat model says so);
* a fully masked row gives output 0 and log-sum-exp 0 (finite by convention).

How the kernels stay fast on fragmented layouts: tokens are sorted by domain into
domain-pure tiles (``domainguard.kernels.plan``); causality follows each token's sequence
index, so 64-token chat turns cost what 4K-token documents do (BENCHMARKS.md).

Error codes (KernelError): DG311 malformed q/k/v, layout mismatch, q_slice or backend;
DG312 query heads not a multiple of key/value heads; DG313 more than 63 domains;
DG314 dtype (bf16, fp16, fp32 only, all three alike); DG315 patterns that differ between
heads (the kernels enforce one mask for all heads: use ``backend="reference"``); DG316 head dim other than 64 or 128; DG317 layer out of range;
DG318 a plan built for another mask or shape; DG319 a plan that does not describe the
layout it is given with (labels, slot order, tile purity, table bounds, or tile tables other than
the block map of its own slots); DG320 a pattern value (window × dilation, stride, block size,
global tokens) of 2**31 or more; DG321 a KernelConfig whose key tile sizes do not nest (block_n and the dk/dv
SUB_N: the larger must be a multiple of the smaller).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch

from .errors import KernelError

__all__ = ["attention", "attention_reference", "GuardedAttention", "AttentionPlan", "KernelConfig", "EMPTY_ROW_LSE"]

# Log-sum-exp reported for a row with no allowed key (its output is 0).
EMPTY_ROW_LSE = 0.0

_SUPPORTED_HEAD_DIMS = (64, 128)
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --- shapes and masks ---------------------------------------------------------------
def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate q/k/v; return (B, Hq, Hkv, Nq, Nk, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelError(
            f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
            code="DG311",
        )
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if k.shape != v.shape or bk != b or dk != d:
        raise KernelError(
            f"k and v must be [B, Hkv, Nk, D] matching q [B, Hq, Nq, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}",
            code="DG311",
        )
    if hkv == 0 or hq % hkv != 0:
        raise KernelError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA", code="DG312"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise KernelError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", code="DG314")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise KernelError(f"dtype {q.dtype} unsupported; use bfloat16, float16 or float32", code="DG314")
    return b, hq, hkv, nq, nk, d


def _normalize_q_slice(q_slice, n: int) -> slice:
    """``None`` → all tokens; an int ``m`` → the last ``m``; a slice → itself (step 1)."""
    if q_slice is None:
        return slice(0, n)
    if isinstance(q_slice, int):
        if not 0 < q_slice <= n:
            raise KernelError(f"q_slice={q_slice} must be in 1..{n}", code="DG311")
        return slice(n - q_slice, n)
    start, stop, step = q_slice.indices(n)
    if step != 1 or stop <= start:
        raise KernelError(f"q_slice {q_slice} must be a non-empty contiguous slice", code="DG311")
    return slice(start, stop)


def _heads_vary(compiled) -> bool:
    """True when some pattern names ``heads`` (so masks may differ per head)."""
    for value in compiled.policy.patterns.values():
        for pat in value if isinstance(value, list) else [value]:
            if pat.heads is not None:
                return True
    return False


def dense_mask_for(layout, compiled, layer: int, heads: int, q_slice=None) -> torch.Tensor:
    """The ground-truth mask, bool ``[B, Hm, Nq, Nk]`` with ``Hm`` 1 (heads share) or ``heads``."""
    n = layout.domain_ids.shape[1]
    qs = _normalize_q_slice(q_slice, n)
    from .patterns import dense_mask

    if not _heads_vary(compiled):
        return dense_mask(layout, compiled, layer, 0, q_slice=qs)[:, None]
    return torch.stack([dense_mask(layout, compiled, layer, h, q_slice=qs) for h in range(heads)], dim=1)


# --- reference ------------------------------------------------------------------------
def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


class _MaskedPV(torch.autograd.Function):
    """``sum_j p_ij v_j`` over allowed pairs only, forward and backward: a masked pair's value never meets
    a product, so a NaN or Inf reaches exactly the rows (and, backward, the keys) that may read it.

    p [B, H, Nq, Nk] (0 where masked), v [B, H, Nk, D], mask broadcastable to p. The fast
    products run on operands with non-finite entries zeroed, which is exact wherever no
    allowed pair meets one; pairs that do are recomputed one by one, so IEEE semantics hold
    for them and no other row or key can see those values.
    """

    @staticmethod
    def forward(ctx, p, v, mask):
        ctx.save_for_backward(p, v, mask)
        if bool(torch.isfinite(v).all()):
            return p @ v
        out = p @ _zero_nonfinite(v)
        finite = torch.isfinite(v).all(-1)  # [B, H, Nk]
        full = mask.expand_as(p)
        needs = (full & ~finite[:, :, None, :]).any(-1)  # rows that legitimately read a non-finite v
        for b, h, i in needs.nonzero().tolist():
            terms = p[b, h, i, :, None] * v[b, h]
            out[b, h, i] = torch.where(full[b, h, i, :, None], terms, torch.zeros_like(terms)).sum(0)
        return out

    @staticmethod
    def backward(ctx, g):
        p, v, mask = ctx.saved_tensors
        full = mask.expand_as(p)
        if bool(torch.isfinite(v).all()):
            grad_p = g @ v.transpose(-1, -2)
        else:
            vfin = torch.isfinite(v).all(-1)
            grad_p = g @ _zero_nonfinite(v).transpose(-1, -2)
            bad = full & ~vfin[:, :, None, :]  # allowed pairs whose v is not finite
            if bool(bad.any()):
                b, h, i, j = bad.nonzero(as_tuple=True)
                grad_p = grad_p.index_put((b, h, i, j), (g[b, h, i] * v[b, h, j]).sum(-1))
        if bool(torch.isfinite(g).all()):
            return grad_p, p.transpose(-1, -2) @ g, None
        gfin = torch.isfinite(g)
        grad_v = p.transpose(-1, -2) @ torch.where(gfin, g, torch.zeros((), dtype=g.dtype, device=g.device))
        bad = full & ~gfin.all(-1)[:, :, :, None]  # allowed pairs whose row's gradient is not finite
        if bool(bad.any()):
            b, h, i, j = bad.nonzero(as_tuple=True)
            rest = torch.where(gfin, torch.zeros((), dtype=g.dtype, device=g.device), g)[b, h, i]
            grad_v = grad_v.index_put((b, h, j), p[b, h, i, j, None] * rest, accumulate=True)
        return grad_p, grad_v, None


def _masked_pv(p: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_j p_ij v_j`` over allowed pairs only (``_MaskedPV``)."""
    return _MaskedPV.apply(p, v, mask)


def _masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q_i . k_j`` where allowed (masked pairs: a finite value the caller replaces by -inf).

    The product runs on q and k with non-finite entries zeroed, so no masked pair multiplies a NaN
    or Inf — forward, nor backward, where dq = dS K and dk = dS^T Q would otherwise turn a masked
    pair's exact 0 into 0 * NaN. Allowed pairs that meet a non-finite entry are recomputed one by
    one (their score is not finite either way)."""
    if bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()):
        return (q @ k.transpose(-1, -2)) * scale
    qfin, kfin = torch.isfinite(q).all(-1), torch.isfinite(k).all(-1)
    s = (_zero_nonfinite(q) @ _zero_nonfinite(k).transpose(-1, -2)) * scale
    bad = mask.expand_as(s) & ~(qfin[..., :, None] & kfin[..., None, :])
    if bool(bad.any()):
        b, h, i, j = bad.nonzero(as_tuple=True)
        s = s.index_put((b, h, i, j), (q[b, h, i] * k[b, h, j]).sum(-1) * scale)
    return s


def reference_from_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact masked attention in float32 on a given bool mask ``[B, 1|Hq, Nq, Nk]``.

    Returns (out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32). Differentiable.
    """
    b, hq, hkv, nq, nk, d = _check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    s = _masked_scores(qf, kf, mask, scale)
    s = torch.where(mask, s, torch.full((), -math.inf, device=s.device))
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m_safe)  # exactly 0 where masked
    l = p.sum(-1, keepdim=True)
    num = _masked_pv(p, vf, mask)
    empty = l == 0
    out = torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(l), l))
    lse = torch.where(empty, torch.full_like(l, EMPTY_ROW_LSE), m_safe + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return out.to(q.dtype), lse.squeeze(-1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout,
    compiled,
    layer: int = 0,
    *,
    q_slice=None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Plain-PyTorch guarded attention with exact semantics (the ground truth)."""
    b, hq, hkv, nq, nk, d = _check_shapes(q, k, v)
    n = layout.domain_ids.shape[1]
    qs = _normalize_q_slice(q_slice, n)
    if nk != n or nq != qs.stop - qs.start:
        raise KernelError(
            f"layout has {n} tokens (queries {qs.start}..{qs.stop - 1}) but q has {nq} and k/v {nk}",
            code="DG311",
        )
    mask = dense_mask_for(layout, compiled, layer, hq, qs).to(q.device)
    out, lse = reference_from_mask(q, k, v, mask, scale=scale)
    return (out, lse) if return_lse else out


# --- kernel path ----------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of the forward and backward kernels (tuned on an H100)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    dkdv: tuple = (("SUB_N", 64), ("SUB_M", 32), ("num_warps", 4), ("num_stages", 3))
    dq: tuple = (("SUB_M", 64), ("SUB_N", 64), ("num_warps", 4), ("num_stages", 2))
    check_full: bool = True
    use_tma: bool = True
    warp_specialize: bool = False
    fwd_gluon: bool = True  # on an sm_90 GPU, the warp-specialised Gluon forward (kernels/forward_sm90.py)
    fwd_gluon_per: int = 2  # its 64-key tiles per step of a trusted run (2: 128-key products)
    dq_tma: bool = True  # the dq kernel reads K/V through tensor descriptors
    dq_gluon: bool = True  # on an sm_90 GPU, the warp-specialised Gluon dq kernel (kernels/dq_sm90.py)
    bwd_concurrent: bool = True  # dq on a side stream beside dk/dv (a GPU only)
    head_group: int = 0  # heads per group of a launch (kernels.forward._schedule); 0: by the GPU's L2 cache

    @property
    def block_kt(self) -> int:
        """Keys per tile of the key-major tables: one dk/dv program's keys (``dkdv`` SUB_N), or
        ``block_n`` when that is larger. Key slots are padded to it, so its tiles are domain-pure."""
        return max(self.block_n, dict(self.dkdv)["SUB_N"])


def default_config(dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """The tuned configuration for a dtype and head dim (see BENCHMARKS.md)."""
    if dtype == torch.float32:
        # fp32 dots are IEEE (no tensor cores). At head dim 128 a 64-query tile spills several KB
        # per thread in the forward; 32 queries with 8 warps do not (H100: 149 -> 7.9 ms at 8K).
        wide = head_dim > 64
        return KernelConfig(
            block_m=32 if wide else 64, block_n=64, num_warps=8 if wide else 4, num_stages=2, use_tma=False,
            dq_tma=False,
            dkdv=(("SUB_N", 32), ("SUB_M", 32), ("num_warps", 4), ("num_stages", 1)),
            dq=(("SUB_M", 32), ("SUB_N", 32), ("num_warps", 4), ("num_stages", 1)),
        )
    if head_dim > 64:
        # dq programs of a whole 128-query tile, 8 warps, 3 stages: on an H100 forward+backward 2-4%
        # faster at 32K-128K (repeated A/B, BENCHMARKS.md); level at 8K. Head dim 64 not measured.
        return KernelConfig(dq=(("SUB_M", 128), ("SUB_N", 64), ("num_warps", 8), ("num_stages", 3)))
    return KernelConfig()


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """Everything a call needs besides q/k/v: slot order, tile lists, schedule. Reusable across calls."""

    qs: "Slots"
    ks: "Slots"
    runs: tuple  # (full, partial) plan.Runs, query-major: [B, Hm, Tq, R]
    runs_t: tuple  # the same, key-major, for dk/dv
    order: torch.Tensor  # int32 [B, Tq]: launch order of query tiles (forward, dq), heaviest first
    order_t: torch.Tensor  # int32 [B, Tkt]: launch order of key tiles of runs_t (dk/dv), heaviest first
    q_inv: torch.Tensor  # int32 [B, Nq]: slot of each query token
    mask_key: tuple  # (rel_bits, causal_bits, num_domains, pattern): the mask the tables were built for
    config: KernelConfig
    nq: int
    nk: int
    heads: int  # Hm: 1 when heads share the mask

    def stats(self) -> dict:
        full, part = self.runs
        return {"full_tiles": full.tiles, "partial_tiles": part.tiles, "slots_q": self.qs.size,
                "slots_k": self.ks.size, "max_runs": (full.start.shape[-1], part.start.shape[-1])}


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """Plan of a decode step: the few queries sorted into domain-pure tiles of QT slots (``decode_rows``).

    Nothing else: the kernel reads the keys in the caller's order with their labels straight from
    the layout and builds each tile's mask from the frozen constants, so one plan serves every
    layer of a step and there is no key-side table to build, copy or trust."""

    qs: "Slots"
    nq: int
    nk: int
    group: int


# Queries per call up to which the split-KV decode kernel is used (without gradients).
DECODE_MAX_QUERIES = 16
DECODE_BLOCK_N = 64


_PLAN_CACHE_SIZE = 64


def _mask_key(tables) -> tuple:
    """What a plan's tile tables depend on: the frozen relation, causal flags and patterns."""
    return (tables.rel_bits, tables.causal_bits, tables.num_domains, tables.pattern)


class _FrozenView:
    """What the blockmap builder needs from a CompiledPolicy, with the relation taken from frozen tables."""

    def __init__(self, compiled, relations: dict[int, torch.Tensor]) -> None:
        self._compiled = compiled
        self._relations = relations
        self.policy = compiled.policy
        self.num_domains = compiled.num_domains
        self.pad_id = compiled.pad_id

    def relation(self, layer: int) -> torch.Tensor:
        return self._relations[layer].clone()

    def pattern(self, domain: int, layer: int, head: int = 0):
        return self._compiled.pattern(domain, layer, head)


def _plan_problem(checks) -> str | None:
    """The message of the first failing ``(ok, message)`` check (``ok`` a bool or a bool tensor)."""
    for ok, message in checks:
        if not bool(ok.all() if isinstance(ok, torch.Tensor) else ok):
            return message
    return None


def _tensor_problem(name: str, t, shape: tuple, dtype: torch.dtype, device) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name} is not a tensor"
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        return (f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}; "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return None


def _slots_problem(what: str, s, attrs, n: int, block: int, pad_id: int, device, *, query: bool) -> str | None:
    """Does ``s`` hold every token of ``attrs`` exactly once, with the layout's own attributes,
    in tiles of ``block`` slots that are domain-pure (keys: padding slots aside)?"""
    b = attrs.domain.shape[0]
    size = s.tok.shape[-1] if isinstance(s.tok, torch.Tensor) and s.tok.dim() == 2 else -1
    if size <= 0 or size % block:
        return f"{what} slots: {size} slots is not a positive multiple of the tile size {block}"
    for name in ("tok", "dom", "idx", "rank"):
        bad = _tensor_problem(f"{what} slots.{name}", getattr(s, name), (b, size), torch.int32, device)
        if bad:
            return bad
    tok = s.tok.long()
    real = tok >= 0
    safe = tok.clamp(0, max(n - 1, 0))
    seen = torch.zeros(b, n + 1, dtype=torch.long, device=device)
    seen.scatter_add_(1, torch.where(real & (tok < n), tok, n), torch.ones_like(tok))
    dom = s.dom.long().view(b, size // block, block)
    checks = [
        ((tok >= -1) & (tok < n), f"{what} slots name tokens outside 0..{n - 1}"),
        (seen[:, :n] == 1, f"{what} slots do not hold every token exactly once"),
    ]
    for name, mine in (("domain", attrs.domain), ("index", attrs.index), ("rank", attrs.rank)):
        theirs = getattr(s, {"domain": "dom", "index": "idx", "rank": "rank"}[name]).long()
        want = mine.to(device).long().gather(1, safe)
        checks.append((~real | (theirs == want), f"{what} slot {name}s differ from the layout's"))
    if query:
        checks.append((dom == dom[..., :1], f"{what} tiles of {block} slots are not domain-pure"))
    else:
        checks.append((real | ((s.dom == pad_id) & (s.idx == -1)), f"{what} padding slots must have the pad domain"))
        checks.append(((dom == dom[..., :1]) | (dom == pad_id), f"{what} tiles of {block} slots are not domain-pure"))
    return _plan_problem(checks)


def _runs_problem(what: str, runs, b: int, rows: int, cols: int, device) -> str | None:
    num, start, end = runs.num, runs.start, runs.end
    if not isinstance(num, torch.Tensor) or num.dim() != 3 or num.shape[0] != b or num.shape[2] != rows:
        return f"{what} runs: num must be [B={b}, H, {rows}]"
    r = start.shape[-1] if isinstance(start, torch.Tensor) and start.dim() == 4 else 0
    for name, t, shape in (("num", num, num.shape), ("start", start, (*num.shape, r)), ("end", end, (*num.shape, r))):
        bad = _tensor_problem(f"{what} runs.{name}", t, shape, torch.int32, device)
        if bad:
            return bad
    live = torch.arange(r, device=device) < num.long()[..., None]
    return _plan_problem([
        ((num >= 0) & (num <= r), f"{what} runs: a run count outside 0..{r}"),
        (~live | ((start >= 0) & (start <= end) & (end <= cols)), f"{what} runs: a run outside tiles 0..{cols}"),
    ])


def _slot_attrs(s):
    """A ``Slots``' labels as the ``TokenAttrs`` the block-map builder takes."""
    from domainguard.layout import TokenAttrs

    return TokenAttrs(s.dom.long(), s.idx.long(), s.rank.long())


def check_plan(plan, layout, q_slice: slice, pad_id: int, device, *, hq: int, hkv: int, kinds_of=None) -> None:
    """Refuse (DG319) a plan given to a call that does not describe ``layout``.

    The kernels take token labels, slot order and tile lists from the plan. What is checked on
    the GPU at every call (by the table-check kernels the launchers run right before them) is at
    domain level: that a query tile (forward, dq) or key block (dk/dv) is of one domain, and that
    each tile the run tables list is one it may read (a key tile's domain from its first slot; a
    query tile's from every row), and every slot of the PARTIAL key tiles the forward and dq
    tables list; that cannot check labels against the layout, FULL key tiles' purity in the
    forward and dq, or positions inside a FULL tile. So a
    plan from outside is re-derived against the layout here: every token in exactly one slot with the layout's own domain, index and rank; tiles
    domain-pure; run tables and launch order inside their bounds; and,
    when ``kinds_of(q_attrs, k_attrs, block_q, block_k)`` is given (the block map of the
    plan's own slots under the frozen relation and patterns), tile tables equal to it — so
    no FULL tile can carry a pair that causality or a pattern excludes (the kernels check a
    FULL tile's domains, not its positions), and no allowed pair is dropped.
    """
    from domainguard.kernels.plan import inverse, merge_key_tiles, runs_kinds

    def kinds_problem(what, have, want):
        if have.shape != want.shape:
            return f"{what} tile table has shape {tuple(have.shape)}, the layout's {tuple(want.shape)}"
        bad = (have != want).nonzero()
        if not len(bad):
            return None
        names = {0: "EMPTY", 1: "PARTIAL", 2: "FULL", 255: "more than one run"}
        bi, hi, ti, ui = (int(x) for x in bad[0])
        return (f"{what} tile table differs from the layout's block map in {len(bad)} tile(s), first at "
                f"batch {bi}, head {hi}, query tile {ti}, key tile {ui}: plan says "
                f"{names.get(int(have[bi, hi, ti, ui]), '?')}, the layout gives {names[int(want[bi, hi, ti, ui])]}")

    qa, ka = layout.attrs(q_slice), layout.attrs()
    b, nq, nk = qa.domain.shape[0], qa.domain.shape[1], ka.domain.shape[1]

    def refuse(problem):
        if problem:
            raise KernelError(f"plan does not describe this layout: {problem}", code="DG319",
                              hint="pass plan=None, or a plan built by this GuardedAttention for this layout")

    if isinstance(plan, DecodePlan):
        from domainguard.kernels.decode import decode_rows

        qt = decode_rows(hq // hkv)[0]
        refuse(_plan_problem([(plan.group == hq // hkv, f"decode plan is for GQA groups of {plan.group}, not {hq // hkv}")]))
        refuse(_slots_problem("query", plan.qs, qa, nq, qt, pad_id, device, query=True))
        return

    cfg = plan.config
    refuse(_plan_problem([(isinstance(cfg, KernelConfig), "plan.config is not a KernelConfig")]))
    refuse(_slots_problem("query", plan.qs, qa, nq, cfg.block_m, pad_id, device, query=True))
    refuse(_slots_problem("key", plan.ks, ka, nk, cfg.block_kt, pad_id, device, query=False))
    tq, tk, tkt = plan.qs.size // cfg.block_m, plan.ks.size // cfg.block_n, plan.ks.size // cfg.block_kt
    heads = {getattr(getattr(r, "num", None), "shape", (0, 0))[1:2] for r in (*plan.runs, *plan.runs_t)}
    refuse(_plan_problem([(len(heads) == 1, "plan run tables disagree on their head axis")]))
    for what, runs, rows, cols in (("FULL", plan.runs[0], tq, tk), ("PARTIAL", plan.runs[1], tq, tk),
                                   ("key-major FULL", plan.runs_t[0], tkt, tq), ("key-major PARTIAL", plan.runs_t[1], tkt, tq)):
        refuse(_runs_problem(what, runs, b, rows, cols, device))
    refuse(_tensor_problem("plan.order", plan.order, (b, tq), torch.int32, device))
    refuse(_tensor_problem("plan.order_t", plan.order_t, (b, tkt), torch.int32, device))
    refuse(_plan_problem([
        (torch.sort(plan.order.long(), dim=1).values == torch.arange(tq, device=device), "plan.order is not an order of the query tiles"),
        (torch.sort(plan.order_t.long(), dim=1).values == torch.arange(tkt, device=device),
         "plan.order_t is not an order of the key tiles"),
        (isinstance(plan.q_inv, torch.Tensor) and plan.q_inv.shape == (b, nq) and torch.equal(plan.q_inv, inverse(plan.qs, nq)),
         "plan.q_inv is not the inverse of the query slots"),
    ]))
    if kinds_of is not None:
        want = kinds_of(_slot_attrs(plan.qs), _slot_attrs(plan.ks), cfg.block_m, cfg.block_n).to(device)
        refuse(kinds_problem("plan", runs_kinds(*plan.runs, tk), want))
        want_t = merge_key_tiles(want, cfg.block_kt // cfg.block_n).transpose(-1, -2)
        refuse(kinds_problem("plan key-major", runs_kinds(*plan.runs_t, tq), want_t))


def _decode_slots(qa, pad_id: int, qt: int):
    """``sort_slots`` of a decode step's query tokens into tiles of ``qt``; one query (the common
    step) takes a path of a few tensor ops with no device sync, the same slots ``sort_slots`` gives."""
    from domainguard.kernels.plan import Slots, sort_slots

    b, nq = qa.domain.shape
    if nq != 1:
        return sort_slots(qa.domain, qa.index, qa.rank, pad_id, qt, query=True)
    tok = torch.full((b, qt), -1, dtype=torch.int32, device=qa.domain.device)
    tok[:, 0] = 0
    # Padding slots copy the one real slot (as sort_slots pads a query tile).
    same = lambda t: t.to(torch.int32).expand(b, qt).contiguous()  # noqa: E731
    return Slots(tok=tok, dom=same(qa.domain), idx=same(qa.index), rank=same(qa.rank), block=qt)


def _kernels_usable(q: torch.Tensor) -> bool:
    if q.device.type == "cuda":
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


class _GuardedAttentionFn(torch.autograd.Function):
    """Forward and backward through the frozen kernels (wired for fine-tuning certified models)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttentionPlan, tables, scale: float):
        from domainguard.kernels.forward import launch_forward

        cfg = plan.config
        # K/V in slot order: copied once (in the launch that checks the tables), read by the forward
        # and kept for the backward in place of k and v, so no more memory is held than before and
        # the backward does not copy again.
        out, lse2, (kp, vp) = launch_forward(
            q, k, v, plan.qs, plan.ks, plan.runs, plan.order, tables, scale,
            block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            check_full=cfg.check_full, use_tma=cfg.use_tma, warp_specialize=cfg.warp_specialize, keep_kv=True,
            gluon=cfg.fwd_gluon and cfg.fwd_gluon_per, head_group=cfg.head_group,
        )
        ctx.save_for_backward(q, kp, vp, out, lse2)
        ctx.kv_shapes = (k.shape, v.shape)
        ctx.plan, ctx.tables, ctx.scale = plan, tables, scale
        ctx.mark_non_differentiable(lse2)
        # lse2 never has a gradient: without this autograd would launch a fill of zeros for it.
        ctx.set_materialize_grads(False)
        return out, lse2

    @staticmethod
    def backward(ctx, dout, _dlse2):
        from domainguard.kernels.backward import launch_backward
        from domainguard.kernels.permute import backward_inputs

        if dout is None:  # no gradient reached the output (grads are not materialised): none flows back
            return None, None, None, None, None, None
        q, kp, vp, out, lse2 = ctx.saved_tensors
        plan, cfg = ctx.plan, ctx.plan.config
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        qp, dop, delta_s = backward_inputs(q, dout, out, plan.qs.tok)
        # Every real token owns a slot and every slot is written: no zero-fill needed.
        dq = torch.empty_like(q)
        dk, dv = (torch.empty(shape, dtype=kp.dtype, device=kp.device) for shape in ctx.kv_shapes)
        launch_backward(
            qp, dop, lse2, delta_s, kp, vp, dq, dk, dv, plan.qs, plan.ks, plan.runs, plan.runs_t, plan.order,
            plan.order_t, ctx.tables, ctx.scale, block_m=cfg.block_m, block_n=cfg.block_n, block_kt=cfg.block_kt,
            dkdv_cfg=dict(cfg.dkdv), dq_cfg=dict(cfg.dq), check_full=cfg.check_full, dq_tma=cfg.dq_tma,
            concurrent=cfg.bwd_concurrent, head_group=cfg.head_group, dq_gluon=cfg.dq_gluon,
        )
        return dq, dk, dv, None, None, None


class GuardedAttention:
    """Frozen guarded attention for one compiled policy.

    At construction the relation of every layer is copied into constants (``FrozenTables``)
    that the kernels are specialised on; tile tables are built from that copy too, so
    nothing passed to a call — tensors, layouts, plans — can widen what is enforced.
    ``digest()`` covers the kernel source files and those tables.
    """

    def __init__(self, compiled, config: KernelConfig | None = None) -> None:
        from domainguard.kernels.tables import freeze

        self.compiled = compiled
        self.config = config
        self._relations = {l: compiled.relation(l).clone() for l in range(compiled.num_layers)}
        self._tables = {}
        self._unsupported: dict[int, KernelError] = {}
        for layer in range(compiled.num_layers):
            try:
                self._tables[layer] = freeze(compiled, layer)
            except KernelError as err:  # kept; raised when that layer is asked to run on the kernels
                self._unsupported[layer] = err
        self._view = _FrozenView(compiled, self._relations)
        self._plans: dict = {}
        self._checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._heads_vary = _heads_vary(compiled)

    # --- identity ------------------------------------------------------------------
    def tables(self, layer: int):
        """The FrozenTables of ``layer`` (KernelError if the kernels cannot enforce it)."""
        if layer in self._unsupported:
            raise self._unsupported[layer]
        if layer not in self._tables:
            raise KernelError(f"layer {layer} outside 0..{self.compiled.num_layers - 1}", code="DG317")
        return self._tables[layer]

    def digest(self) -> str:
        """sha256 over the kernel source files, this wrapper's source and every layer's frozen tables."""
        import hashlib

        from domainguard.kernels import source_digest

        h = hashlib.sha256(source_digest().encode())
        # This wrapper freezes the tables and builds the plans the kernels run: covered too.
        from pathlib import Path

        h.update(hashlib.sha256(Path(__file__).read_bytes()).hexdigest().encode())
        for layer in sorted(self._tables):
            h.update(self._tables[layer].digest().encode())
        for layer in sorted(self._unsupported):
            h.update(f"unsupported:{layer}".encode())
        return h.hexdigest()

    # --- planning ------------------------------------------------------------------
    def _cached(self, layout, key, build):
        """Plans are reused while the same layout object lives with the same contents: one plan serves
        every layer with the same mask and every call of a forward pass. A layout whose tensors were
        changed in place since (their version counters moved) gets a new plan."""
        entry = self._plans.get((id(layout), key))
        now = _fingerprint(layout)
        if entry is not None and entry[0]() is layout and entry[2] == now:
            return entry[1]
        plan = build()
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.pop(next(iter(self._plans)))
        self._plans[(id(layout), key)] = (weakref.ref(layout), plan, now)
        return plan

    def _tile_kinds(self, layer: int, qa, ka, block_q: int, block_k: int) -> torch.Tensor:
        """uint8 [B, Hm, Tq, Tk] tile kinds of query/key ``TokenAttrs`` at ``layer``."""
        from domainguard.blockmap import build_blockmap_from_attrs

        # freeze() refused head-dependent masks, so head 0's table serves every head.
        heads = [0] if self._heads_vary else None
        return build_blockmap_from_attrs(qa, ka, self._view, layer, block_q=block_q, block_k=block_k, heads=heads).kinds

    def plan(self, layout, layer: int = 0, *, q_slice=None, heads: int = 1, dtype=torch.bfloat16, head_dim: int = 128) -> AttentionPlan:
        """Slot order and tile lists for ``layout`` at ``layer`` (reusable across calls and layers with equal tables)."""
        from domainguard.kernels.plan import FULL, PARTIAL, inverse, launch_order, merge_key_tiles, sort_slots, tile_runs

        tables = self.tables(layer)
        cfg = self.config or default_config(dtype, head_dim)
        n = layout.domain_ids.shape[1]
        qsl = _normalize_q_slice(q_slice, n)
        pad_id = self.compiled.pad_id
        sub_n = dict(cfg.dkdv)["SUB_N"]
        if cfg.block_kt % cfg.block_n or cfg.block_kt % sub_n:
            raise KernelError(f"dk/dv SUB_N {sub_n} and block_n {cfg.block_n}: the larger must be a multiple of the "
                              f"smaller", code="DG321")
        pad_to = math.lcm(cfg.block_m, cfg.block_kt)
        qa, ka = layout.attrs(qsl), layout.attrs()
        qs = sort_slots(qa.domain, qa.index, qa.rank, pad_id, pad_to, query=True)
        ks = sort_slots(ka.domain, ka.index, ka.rank, pad_id, pad_to, query=False)
        kinds = self._tile_kinds(layer, _slot_attrs(qs), _slot_attrs(ks), cfg.block_m, cfg.block_n)
        # dk/dv programs own block_kt keys: their tables merge block_kt // block_n key tiles.
        kinds_t = merge_key_tiles(kinds, cfg.block_kt // cfg.block_n).transpose(-1, -2).contiguous()
        runs = (tile_runs(kinds, FULL), tile_runs(kinds, PARTIAL))
        runs_t = (tile_runs(kinds_t, FULL), tile_runs(kinds_t, PARTIAL))
        return AttentionPlan(
            qs=qs, ks=ks, runs=runs, runs_t=runs_t, order=launch_order(*runs), order_t=launch_order(*runs_t),
            q_inv=inverse(qs, qsl.stop - qsl.start),
            mask_key=_mask_key(tables), config=cfg, nq=qsl.stop - qsl.start, nk=n,
            heads=kinds.shape[1],
        )

    def decode_plan(self, layout, layer: int, q_slice, *, heads: int, kv_heads: int) -> DecodePlan:
        """The few queries of a decode step sorted by domain into tiles of QT slots (any layer: the
        plan does not depend on the mask)."""
        from domainguard.kernels.decode import decode_rows

        self.tables(layer)  # the layer must exist and run on the kernels
        n = layout.domain_ids.shape[1]
        qsl = _normalize_q_slice(q_slice, n)
        group = heads // kv_heads
        qt, _ = decode_rows(group)
        return DecodePlan(qs=_decode_slots(layout.attrs(qsl), self.compiled.pad_id, qt), nq=qsl.stop - qsl.start,
                          nk=n, group=group)

    def _decode(self, q, k, v, layout, layer, qsl, scale, plan):
        from domainguard.kernels.decode import launch_decode

        tables = self.tables(layer)
        group = q.shape[1] // k.shape[1]
        if plan is None:
            key = ("decode", qsl.start, qsl.stop, group)
            plan = self._cached(layout, key, lambda: self.decode_plan(layout, layer, qsl, heads=q.shape[1], kv_heads=k.shape[1]))
        elif plan.nq != q.shape[2] or plan.nk != k.shape[2]:
            raise KernelError("decode plan was built for another shape", code="DG318")
        else:
            plan = self._check_given(plan, layout, layer, qsl, q, k)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        labels = (t.to(q.device).contiguous() for t in (layout.domain_ids, layout.index, layout.domain_rank))
        return launch_decode(q, k, v, plan.qs, *labels, tables, scale, block_n=DECODE_BLOCK_N)

    def _check_given(self, plan, layout, layer: int, qsl: slice, q, k):
        """The plan to run for a caller's ``plan``: a private copy, made when ``check_plan`` accepted it,
        so no later write to the caller's tensors (in place, through ``.data`` or another alias) reaches
        the kernels. Checked once per (plan, layout, query slice, heads, tables); a plan or layout whose
        tensors changed since (version counters, or a field holding another tensor) is checked again."""
        key = (qsl.start, qsl.stop, q.shape[1], k.shape[1], q.device, getattr(plan, "mask_key", None))  # checked by the caller
        seen = self._checked.get(plan)
        now = (_fingerprint(plan), _fingerprint(layout))
        if seen is not None and seen[0]() is layout and seen[1] == key and seen[2] == now and None not in now:
            return seen[3]
        frozen = copy.deepcopy(plan)  # copied before the check: what is checked is what runs
        check_plan(frozen, layout, qsl, self.compiled.pad_id, q.device, hq=q.shape[1], hkv=k.shape[1],
                   kinds_of=functools.partial(self._tile_kinds, layer))
        self._checked[plan] = (weakref.ref(layout), key, now, frozen)
        return frozen

    # --- running -------------------------------------------------------------------
    def __call__(self, q, k, v, layout, layer: int = 0, *, q_slice=None, scale=None, return_lse=False, plan=None, backend="auto"):
        """Guarded attention of ``layer``; see ``attention``."""
        b, hq, hkv, nq, nk, d = _check_shapes(q, k, v)
        if backend not in ("auto", "triton", "reference"):
            raise KernelError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}", code="DG311")
        if backend == "reference" or (backend == "auto" and not _kernels_usable(q)):
            return attention_reference(q, k, v, layout, self.compiled, layer, q_slice=q_slice, scale=scale, return_lse=return_lse)
        if d not in _SUPPORTED_HEAD_DIMS:
            raise KernelError(
                f"head dim {d} is not supported by the kernels (supported: 64, 128)", code="DG316",
                hint="use backend='reference' or pad the head dim",
            )
        tables = self.tables(layer)
        n = layout.domain_ids.shape[1]
        qsl = _normalize_q_slice(q_slice, n)
        if nk != n or nq != qsl.stop - qsl.start:
            raise KernelError(
                f"layout has {n} tokens (queries {qsl.start}..{qsl.stop - 1}) but q has {nq} and k/v {nk}", code="DG311"
            )
        if layout.domain_ids.shape[0] != b:  # the kernels read one row of labels per batch row
            raise KernelError(f"layout has {layout.domain_ids.shape[0]} batch rows but q/k/v have {b}", code="DG311")
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if isinstance(plan, DecodePlan) or (plan is None and nq <= DECODE_MAX_QUERIES and not needs_grad):
            out, lse = self._decode(q, k, v, layout, layer, qsl, scale, plan)
            return (out, lse) if return_lse else out
        if plan is None:
            key = ("attn", _mask_key(tables), qsl.start, qsl.stop, hq, q.dtype, d)
            plan = self._cached(layout, key, lambda: self.plan(layout, layer, q_slice=qsl, heads=hq, dtype=q.dtype, head_dim=d))
        elif plan.mask_key != _mask_key(tables) or plan.nq != nq or plan.nk != nk:
            raise KernelError("plan was built for another layer, policy or shape", code="DG318")
        else:
            plan = self._check_given(plan, layout, layer, qsl, q, k)
        # The kernels read rows of q/k/v in place: each row's D values must be contiguous.
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse2 = _GuardedAttentionFn.apply(q, k, v, plan, tables, scale)
        if not return_lse:
            return out
        from domainguard.kernels.forward import LN2

        inv = plan.q_inv.long()[:, None, :].expand(-1, hq, -1)
        return out, lse2.gather(2, inv) * LN2


_FIELDS_OF: dict = {}


def _dataclass_fields(cls) -> tuple | None:
    """Field names ``_fingerprint`` walks in instances of ``cls`` (None: not a dataclass), looked up once
    per class: ``dataclasses.fields`` on every call was most of a fingerprint's host time. A layout's
    compiled policy and a plan's frozen KernelConfig hold no tensor: skipped, they are the slow part."""
    try:
        return _FIELDS_OF[cls]
    except KeyError:
        pass
    names = None
    if dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("compiled", "config"))
    _FIELDS_OF[cls] = names
    return names


def _fingerprint(obj, depth: int = 0):
    """Identity and version counter of every tensor ``obj`` holds (dataclass fields, tuples, lists, dicts):
    equal fingerprints mean nothing was replaced or changed in place. None where a tensor keeps no
    version counter (made under ``torch.inference_mode``): such contents cannot be vouched for."""
    if isinstance(obj, torch.Tensor):
        try:
            return (id(obj), obj._version)
        except RuntimeError:
            return None
    if depth > 4:
        return ()
    names = _dataclass_fields(type(obj))
    if names is not None:
        parts = [_fingerprint(getattr(obj, name), depth + 1) for name in names]
    elif isinstance(obj, (tuple, list)):
        if not obj or not (isinstance(obj[0], (torch.Tensor, tuple, list, dict)) or dataclasses.is_dataclass(obj[0])):
            return ()  # numbers and names (a mask key, a config): nothing a kernel reads in place
        parts = [_fingerprint(x, depth + 1) for x in obj]
    elif isinstance(obj, dict):
        parts = [_fingerprint(x, depth + 1) for x in obj.values()]
    else:
        return ()
    return None if any(p is None for p in parts) else tuple(parts)


_GUARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _guard_for(compiled) -> GuardedAttention:
    guard = _GUARDS.get(compiled)
    if guard is None:
        guard = GuardedAttention(compiled)
        _GUARDS[compiled] = guard
    return guard


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout,
    compiled,
    layer: int = 0,
    *,
    q_slice=None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Guarded attention: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] → [B, Hq, Nq, D].

    ``backend="auto"`` runs the frozen Triton kernels on CUDA (or under
    ``TRITON_INTERPRET=1``) and the reference elsewhere; ``"triton"`` / ``"reference"``
    force one. ``q_slice`` (an int: the last q tokens, or a slice) selects the query
    tokens of the layout (chunked prefill, decode). ``return_lse`` also returns the
    natural-log log-sum-exp [B, Hq, Nq] (0 for rows with no allowed key).
    """
    return _guard_for(compiled)(
        q, k, v, layout, layer, q_slice=q_slice, scale=scale, return_lse=return_lse, backend=backend
    )
