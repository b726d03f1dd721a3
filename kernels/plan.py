"""Slot order: tokens sorted by domain so that kernel tiles are domain-pure.

Attention does not depend on the order of keys, and every mask predicate is a
function of per-token attributes only (domain, sequence index, domain rank), so the
kernels may work on any permutation of the tokens. We sort each row's tokens by
domain (stably, so sequence order is kept inside a domain) and pad every domain's
group to a multiple of the tile size. Then each tile holds one domain only:

* a tile pair whose domains the relation forbids is EMPTY and never loaded, however
  finely the domains interleave in the original sequence (64-token chat turns as much
  as 4K-token documents);
* inside an allowed pair, causality follows the original sequence index, which is
  monotone inside a group, so the allowed region is a staircase and most tiles are
  FULL: a fragmented layout costs what a contiguous one does.

Padding slots: a query padding slot copies the attributes of the last real query of
its group (its output is never stored, and it cannot change a tile's kind); a key
padding slot has the pad domain (nobody reads it) and index -1, and its K/V rows are
zero. ``slot_tok[b, s]`` is the token a slot holds, or -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Slots:
    """Per-slot attributes of one side (queries or keys), all int32 [B, S]."""

    tok: torch.Tensor  # token position in the caller's tensor, -1 for padding
    dom: torch.Tensor  # domain id (pad id D for key padding)
    idx: torch.Tensor  # sequence index (-1 for key padding)
    rank: torch.Tensor  # rank within the domain (-1 for key padding)
    block: int  # every domain group starts at a multiple of this

    @property
    def size(self) -> int:
        return self.tok.shape[1]


def sort_slots(dom: torch.Tensor, idx: torch.Tensor, rank: torch.Tensor, pad_id: int, block: int, *, query: bool) -> Slots:
    """Sort tokens [B, N] by domain into groups padded to ``block``; see the module docstring.

    O(B·N log N) on the tokens' device; never materialises anything N x N.
    """
    b, n = dom.shape
    dev = dom.device
    dom = dom.long()
    num = pad_id + 1
    counts = torch.zeros(b, num, dtype=torch.long, device=dev)
    counts.scatter_add_(1, dom, torch.ones_like(dom))
    padded = (counts + block - 1) // block * block
    group_start = padded.cumsum(1) - padded  # [B, num] first slot of each group
    size = int(padded.sum(1).max().item()) if n else 0
    size = max(size, block)
    # Stable sort by domain keeps sequence order inside each group.
    order = torch.sort(dom, dim=1, stable=True).indices  # [B, N] token positions
    sdom = dom.gather(1, order)
    unpadded_start = counts.cumsum(1) - counts
    within = torch.arange(n, device=dev).expand(b, n) - unpadded_start.gather(1, sdom)
    slot = group_start.gather(1, sdom) + within  # [B, N]

    tok = torch.full((b, size), -1, dtype=torch.long, device=dev)
    tok.scatter_(1, slot, order)
    real = tok >= 0
    safe = tok.clamp(min=0)
    s_dom = torch.where(real, dom.gather(1, safe), torch.full_like(tok, pad_id))
    s_idx = torch.where(real, idx.long().gather(1, safe), torch.full_like(tok, -1))
    s_rank = torch.where(real, rank.long().gather(1, safe), torch.full_like(tok, -1))
    if query:
        # Query padding copies the last real slot before it (same group, same tile):
        # a duplicate of a real query changes no tile's kind, and its row is never stored.
        pos = torch.arange(size, device=dev).expand(b, size)
        last_real = torch.where(real, pos, torch.zeros_like(pos)).cummax(1).values
        s_dom = s_dom.gather(1, last_real)
        s_idx = s_idx.gather(1, last_real)
        s_rank = s_rank.gather(1, last_real)
        # Slots before the first real token (a row with no tokens at all) read nothing.
        none_yet = ~real.cummax(1).values
        s_dom = torch.where(none_yet, torch.full_like(s_dom, pad_id), s_dom)
    return Slots(
        tok=tok.int().contiguous(),
        dom=s_dom.int().contiguous(),
        idx=s_idx.int().contiguous(),
        rank=s_rank.int().contiguous(),
        block=block,
    )


def inverse(slots: Slots, n: int) -> torch.Tensor:
    """int32 [B, n]: the slot holding each token (every token has exactly one)."""
    b, s = slots.tok.shape
    tok = slots.tok.long()
    inv = torch.full((b, n), -1, dtype=torch.long, device=tok.device)
    rows, cols = (tok >= 0).nonzero(as_tuple=True)
    inv[rows, tok[rows, cols]] = cols
    return inv.int().contiguous()


@dataclass(frozen=True)
class Runs:
    """Tiles of one kind as runs of consecutive tile indices: ``[start[r], end[r])`` for r < num.

    In slot order the tiles a query tile visits form a few long runs (about one per
    readable domain), so the kernels iterate affine ranges that pipeline like dense
    attention instead of chasing an index list.
    """

    num: torch.Tensor  # int32 [B, H, T]
    start: torch.Tensor  # int32 [B, H, T, R]
    end: torch.Tensor  # int32 [B, H, T, R]

    @property
    def tiles(self) -> int:
        return int((self.end - self.start).clamp(min=0).sum())


def tile_runs(kinds: torch.Tensor, kind: int) -> Runs:
    """Runs of ``kind`` along the last axis of ``kinds`` uint8 [B, H, T, U] (ascending, valid first)."""
    sel = kinds == kind
    u = sel.shape[-1]
    prev = torch.nn.functional.pad(sel[..., :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(sel[..., 1:], (0, 1), value=False)
    starts = sel & ~prev
    ends = sel & ~nxt  # inclusive ends
    num = starts.sum(-1, dtype=torch.int32)
    r = max(1, int(num.max().item()) if num.numel() else 1)
    ar = torch.arange(u, device=kinds.device, dtype=torch.int32)
    big = torch.full_like(ar, u)
    s_sorted = torch.sort(torch.where(starts, ar, big), dim=-1).values[..., :r]
    e_sorted = torch.sort(torch.where(ends, ar + 1, big + 1), dim=-1).values[..., :r]
    valid = torch.arange(r, device=kinds.device) < num[..., None]
    zero = torch.zeros((), dtype=torch.int32, device=kinds.device)
    start = torch.where(valid, s_sorted, zero).to(torch.int32).contiguous()
    end = torch.where(valid, e_sorted, zero).to(torch.int32).contiguous()
    return Runs(num=num.contiguous(), start=start, end=end)


def launch_order(full: Runs, partial: Runs) -> torch.Tensor:
    """The order in which programs take the tiles of run tables [B, H, T, R]: int32 [B, T], by
    estimated work, heaviest first (ties: later tiles first, so a domain's tiles run together).

    Work per tile, in units of about half a FULL tile's time on an H100: 2 per FULL tile, 3 per
    PARTIAL tile (masked, outside the pipelined loop) and 2 per run (pipeline fill), summed over
    mask heads. The order only schedules: every tile is computed once whatever it is, and the
    results do not depend on it. Starting the heavy tiles first keeps a late heavy tile from
    running on alone at the end (list scheduling's tail)."""

    def tiles(runs: Runs) -> torch.Tensor:
        return (runs.end - runs.start).clamp(min=0).sum(-1, dtype=torch.int64)

    work = (2 * tiles(full) + 3 * tiles(partial) + 2 * (full.num + partial.num).long()).sum(1)  # [B, T]
    t = work.shape[-1]
    later_first = torch.arange(t - 1, -1, -1, device=work.device)
    ranked = torch.sort(work[:, later_first], dim=1, descending=True, stable=True).indices
    return later_first[ranked].to(torch.int32).contiguous()


def merge_key_tiles(kinds: torch.Tensor, r: int) -> torch.Tensor:
    """Tile kinds over groups of ``r`` consecutive key tiles of ``kinds`` uint8 [..., U] (U a multiple
    of r): FULL if all are FULL, EMPTY if all are EMPTY, otherwise PARTIAL. The key-major tables of
    dk/dv programs that own ``r`` tiles' keys."""
    if r == 1:
        return kinds
    g = kinds.unflatten(-1, (-1, r))
    merged = torch.where((g == FULL).all(-1), FULL, torch.where((g == EMPTY).all(-1), EMPTY, PARTIAL))
    return merged.to(torch.uint8)


def runs_kinds(full: Runs, partial: Runs, cols: int) -> torch.Tensor:
    """The tile table that run tables describe, uint8 [B, H, T, cols] (inverse of ``tile_runs``);
    a tile covered by more than one run, or by runs of both kinds, gets 255."""

    def cover(runs: Runs) -> torch.Tensor:
        num, start, end = runs.num.long(), runs.start.long(), runs.end.long()
        live = (torch.arange(start.shape[-1], device=num.device) < num[..., None]).long()
        edges = torch.zeros(*num.shape, cols + 1, dtype=torch.long, device=num.device)
        edges.scatter_add_(-1, start.clamp(0, cols), live)
        edges.scatter_add_(-1, end.clamp(0, cols), -live)
        return edges.cumsum(-1)[..., :cols]

    f, p = cover(full), cover(partial)
    kinds = torch.where(f == 1, FULL, torch.where(p == 1, PARTIAL, EMPTY))
    return torch.where((f + p) > 1, 255, kinds).to(torch.uint8)
