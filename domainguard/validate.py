"""Translation validation of the compiled tile tables (DESIGN §4).

Two independent checks, both returning certificate claims (dicts shaped like
``certificate.Claim``):

* ``check_blockmap`` — exhaustive: re-derives every tile of one concrete BlockMap from
  the dense reference mask (patterns.dense_mask) and compares. Scope: that layout.
* Z3 proofs (below) — symbolic over every layout up to a maximum length and segment count.
"""

from __future__ import annotations

import time

import torch

from .blockmap import EMPTY, FULL, PARTIAL, BlockMap
from .patterns import token_mask, rules_for

EXHAUSTIVE_VERSION = "1"


# --- exhaustive checker ----------------------------------------------------------------------


def tile_truth(mask: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a dense mask [B, Nq, Nk]: (some pair allowed, every existing pair allowed), each [B, Tq, Tk]."""
    b, nq, nk = mask.shape
    tq, tk = max(1, -(-nq // block_q)), max(1, -(-nk // block_k))
    padded = torch.zeros(b, tq * block_q, tk * block_k, dtype=torch.bool, device=mask.device)
    exists = torch.zeros_like(padded)
    padded[:, :nq, :nk] = mask
    exists[:, :nq, :nk] = True
    padded = padded.view(b, tq, block_q, tk, block_k)
    exists = exists.view(b, tq, block_q, tk, block_k)
    return padded.any(4).any(2), (padded | ~exists).all(4).all(2)


def _first_pair(bad: torch.Tensor, want: bool, mask_tile: torch.Tensor) -> tuple[int, int]:
    hit = (mask_tile == want).nonzero()
    return int(hit[0, 0]), int(hit[0, 1])


def check_kinds(kinds: torch.Tensor, mask: torch.Tensor, block_q: int, block_k: int) -> dict:
    """Compare one head's kinds [B, Tq, Tk] with a dense mask [B, Nq, Nk]: violations and precision."""
    any_, all_ = tile_truth(mask, block_q, block_k)
    full_bad = (kinds == FULL) & ~all_
    empty_bad = (kinds == EMPTY) & any_
    loose = (kinds == PARTIAL) & (all_ | ~any_)  # sound but could have been EMPTY/FULL
    witness = None
    for bad, kind, want in ((full_bad, "FULL", False), (empty_bad, "EMPTY", True)):
        if bool(bad.any()):
            b, tq, tk = (int(x) for x in bad.nonzero()[0])
            tile = mask[b, tq * block_q : (tq + 1) * block_q, tk * block_k : (tk + 1) * block_k]
            i, j = _first_pair(bad, want, tile)
            witness = {
                "batch": b,
                "tile": [tq, tk],
                "kind": kind,
                "query": tq * block_q + i,
                "key": tk * block_k + j,
                "pair_allowed": want,
            }
            break
    return {
        "full_violations": int(full_bad.sum()),
        "empty_violations": int(empty_bad.sum()),
        "loose_tiles": int(loose.sum()),
        "tiles": int(kinds.numel()),
        "witness": witness,
    }


def check_blockmap(blockmap: BlockMap, compiled, *, q_attrs=None, k_attrs=None) -> dict:
    """Claim: every FULL tile of ``blockmap`` holds only allowed pairs and every EMPTY tile none.

    PROVED means: for this concrete BlockMap and the tokens it was built over, comparing every
    tile against the dense reference mask (patterns.token_mask, O(Nq·Nk)) found no violation.
    ``q_attrs``/``k_attrs`` default to the tokens the map was built from.
    """
    t0 = time.perf_counter()
    q = blockmap._q if q_attrs is None else q_attrs
    k = blockmap._k if k_attrs is None else k_attrs
    relation = compiled.relation(blockmap.layer)
    heads = blockmap.heads if blockmap.heads is not None else (0,)
    totals = {"full_violations": 0, "empty_violations": 0, "loose_tiles": 0, "tiles": 0}
    witness = None
    for row, head in enumerate(heads):
        # The reference uses the policy's rules, never the rules the map was built with.
        mask = token_mask(q, k, relation, rules_for(compiled, blockmap.layer, head))
        res = check_kinds(blockmap.kinds[:, row], mask, blockmap.block_q, blockmap.block_k)
        for key in totals:
            totals[key] += res[key]
        if witness is None and res["witness"] is not None:
            witness = {"head": head, **res["witness"]}
    bad = totals["full_violations"] + totals["empty_violations"]
    claim = {
        "id": f"tables-exhaustive[layer={blockmap.layer}]",
        "kind": "tables-exhaustive",
        "statement": "every FULL tile holds no forbidden pair and every EMPTY tile no allowed pair "
        "(each tile re-derived from the dense reference mask)",
        "scope": {
            "layer": blockmap.layer,
            "heads": list(heads),
            "block_size": [blockmap.block_q, blockmap.block_k],
            "q_len": blockmap.q_len,
            "kv_len": blockmap.kv_len,
            "batch": int(blockmap.kinds.shape[0]),
            "layouts": "this concrete layout only",
        },
        "method": {"name": "exhaustive", "version": EXHAUSTIVE_VERSION, "seconds": round(time.perf_counter() - t0, 6)},
        "status": "REFUTED" if bad else "PROVED",
        "witness": [witness] if witness else None,
        "reason": None,
        "details": totals,
    }
    return claim
