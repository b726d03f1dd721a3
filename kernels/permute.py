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
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    in_range = rows < S
    src = tl.load(Src + b * S + rows, mask=in_range, other=-1)
    ok = (src >= 0) & (src < N)
    src_safe = tl.where(ok, src, 0).to(tl.int64)
    x = tl.load(
        X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + src_safe[:, None] * sxn + cols[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    y_base = Y + (pid_bh.to(tl.int64) * S) * HEAD_DIM
    tl.store(y_base + rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :], x, mask=in_range[:, None])


def gather_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] (last dim contiguous), src int32 [B, S] → contiguous [B, H, S, D]."""
    b, h, n, d = x.shape
    s = src.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
    if b * h * s == 0:
        return y
    block_r = 64 if d <= 64 else 32
    grid = (b * h, triton.cdiv(s, block_r))
    _gather_rows_kernel[grid](
        x, y, src, x.stride(0), x.stride(1), x.stride(2), h, s, n, HEAD_DIM=d, BLOCK_R=block_r
    )
    return y


def gather_rows_reference(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of ``gather_rows``."""
    b, h, n, d = x.shape
    idx = src.long().clamp(min=0)
    y = torch.stack([x[i][:, idx[i]] for i in range(b)])
    return torch.where((src >= 0)[:, None, :, None], y, torch.zeros((), dtype=x.dtype, device=x.device))
