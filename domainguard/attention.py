"""Guarded attention: the public wrappers over the frozen kernels (DESIGN §5).

``attention_reference`` is the plain-PyTorch ground truth; ``attention`` runs the
Triton kernels where they can run (a CUDA device, or ``TRITON_INTERPRET=1``) and the
reference otherwise. ``GuardedAttention`` freezes a compiled policy's relation
tables at construction; nothing passed to a call can widen what it enforces.

Semantics shared by every path (q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``):

* ``mask[b, i, j]`` = relation[d_i, d_j] AND pattern(i, j) AND both tokens valid
  (``domainguard.patterns.dense_mask``); masked scores are ``-inf`` — never a finite
  "large negative" — so a masked pair has probability exactly 0;
* a masked key's values are never multiplied into a row that may not read them
  (``0 * NaN`` would be NaN), so outputs are bitwise independent of forbidden keys;
* a fully masked row gives output 0 and log-sum-exp 0 (finite by convention).
"""

from __future__ import annotations

import math
import os

import torch

from .errors import KernelError

__all__ = ["attention", "attention_reference", "GuardedAttention", "EMPTY_ROW_LSE"]

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


def _minimal_mask(layout, compiled, layer: int, qs: slice) -> torch.Tensor:
    """relation ∧ causal ∧ valid, for use only until ``patterns.dense_mask`` exists."""
    ids = layout.domain_ids
    idx = getattr(layout, "index", None)
    if idx is None:
        idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    rel = compiled.relation(layer).to(ids.device)
    dq, dk = ids[:, qs], ids
    mask = rel[dq[:, :, None], dk[:, None, :]]
    causal = torch.zeros(compiled.num_domains + 1, dtype=torch.bool)
    for d in range(compiled.num_domains):
        pat = compiled.pattern(d, layer)
        causal[d] = bool(pat is not None and pat.causal)
    causal_q = causal.to(ids.device)[dq]
    mask &= ~causal_q[:, :, None] | (idx[:, None, :] <= idx[:, qs, None])
    valid = getattr(layout, "valid", None)
    if valid is not None:
        mask &= valid[:, qs, None] & valid[:, None, :]
    return mask


def dense_mask_for(layout, compiled, layer: int, heads: int, q_slice=None) -> torch.Tensor:
    """The ground-truth mask, bool ``[B, Hm, Nq, Nk]`` with ``Hm`` 1 (heads share) or ``heads``."""
    n = layout.domain_ids.shape[1]
    qs = _normalize_q_slice(q_slice, n)
    try:
        from .patterns import dense_mask
    except ImportError:  # the layout helper's module has not landed yet
        return _minimal_mask(layout, compiled, layer, qs)[:, None]
    if not _heads_vary(compiled):
        return dense_mask(layout, compiled, layer, 0, q_slice=qs)[:, None]
    return torch.stack([dense_mask(layout, compiled, layer, h, q_slice=qs) for h in range(heads)], dim=1)


# --- reference ------------------------------------------------------------------------
def _masked_pv(p: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_j p_ij v_j`` over allowed pairs only: a masked v_j is never multiplied.

    p [B, H, Nq, Nk] (0 where masked), v [B, H, Nk, D], mask broadcastable to p.
    The fast product is exact whenever every v is finite; rows that may read a
    non-finite v are recomputed pair by pair so that IEEE semantics hold for them
    and no other row can see those values.
    """
    finite = torch.isfinite(v).all(-1)  # [B, H, Nk]
    out = p @ torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))
    if bool(finite.all()):
        return out
    mask = mask.expand_as(p)
    needs = (mask & ~finite[:, :, None, :]).any(-1)  # rows that legitimately read a non-finite v
    for b, h, i in needs.nonzero().tolist():
        terms = p[b, h, i, :, None] * v[b, h]
        out[b, h, i] = torch.where(mask[b, h, i, :, None], terms, torch.zeros_like(terms)).sum(0)
    return out


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
    s = (qf @ kf.transpose(-1, -2)) * scale
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


# --- public entry ---------------------------------------------------------------------
def _triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


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
):
    """Guarded attention: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] → [B, Hq, Nq, D]."""
    return attention_reference(
        q, k, v, layout, compiled, layer, q_slice=q_slice, scale=scale, return_lse=return_lse
    )


class GuardedAttention:
    """Frozen guarded attention for one compiled policy (relation tables copied and digested)."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self._relations = torch.from_numpy(compiled.relations.copy())
        self._relations.requires_grad_(False)

    def __call__(self, q, k, v, layout, layer: int = 0, *, q_slice=None, scale=None, return_lse=False):
        return attention(
            q, k, v, layout, self.compiled, layer, q_slice=q_slice, scale=scale, return_lse=return_lse
        )
