"""Row gather: move tokens between the caller's order and the kernels' slot order.

``gather_rows(x, src)`` returns ``y[b, h, s] = x[b, h, src[b, s]]`` with zero rows where
``src[b, s] < 0`` (padding slots). Pure copies: bitwise exact, so poisoned values move
but never mix. The same kernel maps back with the inverse index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    X, Y, Src,
    sxb, sxh, sxn,  # x strides (last dim contiguous)
    H, S, N,
    X2, Y2, s2b, s2h, s2n,  # a second tensor of x's shape moved the same way (PAIR)
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PAIR: tl.constexpr = False,
):
    _gather_rows(tl.program_id(0), tl.program_id(1), X, Y, Src, sxb, sxh, sxn, H, S, N, X2, Y2, s2b, s2h, s2n,
                 HEAD_DIM, BLOCK_R, PAIR)


@triton.jit
def _gather_rows(
    pid_bh, pid_r, X, Y, Src, sxb, sxh, sxn, H, S, N, X2, Y2, s2b, s2h, s2n,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, PAIR: tl.constexpr,
):
    """One program's share of ``_gather_rows_kernel``: rows [pid_r * BLOCK_R, ...) of (batch, head) ``pid_bh``."""
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    in_range = rows < S
    src = tl.load(Src + b * S + rows, mask=in_range, other=-1)
    ok = (src >= 0) & (src < N)
    src_safe = tl.where(ok, src, 0).to(tl.int64)
    y_off = (pid_bh.to(tl.int64) * S) * HEAD_DIM + rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    x = tl.load(
        X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + src_safe[:, None] * sxn + cols[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    tl.store(Y + y_off, x, mask=in_range[:, None])
    if PAIR:
        x2 = tl.load(
            X2 + b.to(tl.int64) * s2b + h.to(tl.int64) * s2h + src_safe[:, None] * s2n + cols[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        tl.store(Y2 + y_off, x2, mask=in_range[:, None])


def gather_block_rows(head_dim: int) -> int:
    """Rows per program of a gather."""
    return 64 if head_dim <= 64 else 32


def gather_rows(x: torch.Tensor, src: torch.Tensor, x2: torch.Tensor | None = None):
    """x [B, H, N, D] (last dim contiguous), src int32 [B, S] → contiguous [B, H, S, D].

    With ``x2`` (x's shape and dtype, e.g. V beside K): both moved in one launch, returned as a pair.
    """
    b, h, n, d = x.shape
    s = src.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
    if x2 is not None:
        if x2.shape != x.shape or x2.dtype != x.dtype:
            raise ValueError(f"gather_rows: x2 {tuple(x2.shape)} {x2.dtype} must match x {tuple(x.shape)} {x.dtype}")
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y2 = torch.empty_like(y)
    else:
        x2, y2 = x, y
    if b * h * s:
        block_r = gather_block_rows(d)
        grid = (b * h, triton.cdiv(s, block_r))
        _gather_rows_kernel[grid](
            x, y, src, x.stride(0), x.stride(1), x.stride(2), h, s, n,
            x2, y2, x2.stride(0), x2.stride(1), x2.stride(2),
            HEAD_DIM=d, BLOCK_R=block_r, PAIR=y2 is not y,
        )
    return (y, y2) if y2 is not y else y


def gather_rows_reference(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of ``gather_rows``."""
    b, h, n, d = x.shape
    idx = src.long().clamp(min=0)
    y = torch.stack([x[i][:, idx[i]] for i in range(b)])
    return torch.where((src >= 0)[:, None, :, None], y, torch.zeros((), dtype=x.dtype, device=x.device))


@triton.jit
def _bwd_prep_kernel(
    Q, DO, O, Qp, DOp, Delta, Src,
    sqb, sqh, sqn, sdb, sdh, sdn, sob, soh, son,
    H, S, N,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Slot-order Q and dO, and Delta = rowsum(O * dO) in float32, in one pass."""
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    in_range = rows < S
    src = tl.load(Src + b * S + rows, mask=in_range, other=-1)
    ok = (src >= 0) & (src < N)
    r = tl.where(ok, src, 0).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + r[:, None] * sqn + cols[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + r[:, None] * sdn + cols[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(O + b64 * sob + h64 * soh + r[:, None] * son + cols[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    out_rows = pid_bh.to(tl.int64) * S + rows
    tl.store(Qp + out_rows[:, None] * HEAD_DIM + cols[None, :], q, mask=in_range[:, None])
    tl.store(DOp + out_rows[:, None] * HEAD_DIM + cols[None, :], do, mask=in_range[:, None])
    tl.store(Delta + out_rows, tl.where(ok, delta, 0.0), mask=in_range)


def backward_inputs(q, do, o, src):
    """(qp, dop [B, H, S, D], delta [B, H, S] fp32) in slot order ``src`` for the backward kernels."""
    b, h, n, d = q.shape
    s = src.shape[1]
    qp = torch.empty(b, h, s, d, dtype=q.dtype, device=q.device)
    dop = torch.empty_like(qp)
    delta = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    block_r = 64 if d <= 64 else 32
    _bwd_prep_kernel[(triton.cdiv(s, block_r), b * h)](
        q, do, o, qp, dop, delta, src,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        h, s, n, HEAD_DIM=d, BLOCK_R=block_r,
    )
    return qp, dop, delta


def backward_inputs_reference(q, do, o, src):
    """PyTorch twin of ``backward_inputs``."""
    delta = (o.float() * do.float()).sum(-1, keepdim=True)
    return (gather_rows_reference(q, src), gather_rows_reference(do, src),
            gather_rows_reference(delta, src)[..., 0])
