"""Layout: which domain every token of a batch belongs to, and its per-token attributes.

A layout is the bridge from text to masks. Every mask predicate (patterns.py) is a
function of three per-token attributes only, never of where a token sits in a tensor:

* ``domain_ids`` — id into ``compiled.domains``; ``compiled.pad_id`` (== D) marks padding,
  a domain nobody reads and that reads nothing;
* ``index`` — the token's sequence index: its position in the row with padding removed
  (causal, window, stride, block-local and random links use it; -1 for padding);
* ``domain_rank`` — how many tokens of the same domain come before it in its row
  (global tokens are the first k of each domain; -1 for padding).

``position_ids`` are what the model's positional encoding sees: ``index`` under
``positions: global``; ``domain_rank`` under ``positions: per_domain`` (which hides
the length of other domains' segments from a token; DESIGN §2 "Positions"); under
``positions: reach`` the count of earlier tokens of the domains a token may hold from
layer 0 on — its own, and for the generation domain every domain whose information
reaches the model's output — so a generated answer sits after everything it may read,
as the model was trained to see it, while a forbidden segment's length stays hidden.

Error codes (LayoutError): DG301 unknown domain name, DG303 domain id out of range,
DG304 prompt does not end with a generation-domain token, DG305 no generation domain,
DG306 malformed input (shapes, dtypes, segments), DG307 text without a tokenizer.
DG302 (layer out of range) is raised by ``CompiledPolicy.relation``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Sequence

import torch

from .errors import LayoutError


class TokenAttrs(NamedTuple):
    """Per-token attributes in any token order; each field is a LongTensor of one shape (e.g. [B, N])."""

    domain: torch.Tensor
    index: torch.Tensor
    rank: torch.Tensor


def _as_long_2d(ids: Any, what: str) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise LayoutError(f"{what} must hold integers, got dtype {t.dtype}", code="DG306")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise LayoutError(f"{what} must be [N] or [B, N], got shape {tuple(t.shape)}", code="DG306")
    return t.to(torch.long, copy=True)  # a layout's own labels: later writes to the caller's tensor don't reach it


def _ranks(domain_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rank[b, i] = number of tokens of domain_ids[b, i]'s domain before i in row b. O(B·N·C)."""
    onehot = torch.nn.functional.one_hot(domain_ids, num_classes)  # [B, N, C]
    before = onehot.cumsum(1) - onehot
    return before.gather(2, domain_ids.unsqueeze(2)).squeeze(2)


@dataclass(frozen=True, eq=False)
class Layout:
    """Per-token domain ids and attributes for a batch; build with ``from_ids`` or ``from_segments``."""

    domain_ids: torch.Tensor  # [B, N] long
    index: torch.Tensor  # [B, N] long, -1 on padding
    position_ids: torch.Tensor  # [B, N] long
    domain_rank: torch.Tensor  # [B, N] long, -1 on padding
    valid: torch.Tensor  # [B, N] bool
    input_ids: torch.Tensor | None
    compiled: Any = field(repr=False)

    # --- shape ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.domain_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.domain_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.domain_ids.device

    @property
    def pad_id(self) -> int:
        return self.compiled.pad_id

    def attrs(self, q_slice: slice | int | None = None) -> TokenAttrs:
        """The mask attributes of all tokens, or of the query tokens selected by ``q_slice``."""
        cols = query_columns(self.seq_len, q_slice)
        return TokenAttrs(self.domain_ids[:, cols], self.index[:, cols], self.domain_rank[:, cols])

    def to(self, device: torch.device | str) -> "Layout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            domain_ids=move(self.domain_ids),
            index=move(self.index),
            position_ids=move(self.position_ids),
            domain_rank=move(self.domain_rank),
            valid=move(self.valid),
            input_ids=move(self.input_ids),
        )

    # --- constructors --------------------------------------------------------------------
    @classmethod
    def from_ids(
        cls,
        compiled,
        domain_ids,
        *,
        pad_mask=None,
        end_with_generation: bool = False,
        input_ids=None,
    ) -> "Layout":
        """Layout from domain ids [B, N] (or [N]); ``pad_mask`` True marks padding (as does id == pad_id)."""
        dom = _as_long_2d(domain_ids, "domain_ids")
        pad = compiled.pad_id
        bad = (dom < 0) | (dom > pad)
        if bool(bad.any()):
            row, col = (int(x) for x in bad.nonzero()[0])
            raise LayoutError(
                f"domain id {int(dom[row, col])} in batch row {row} at position {col} is not a declared domain "
                f"(ids 0..{pad - 1} name {', '.join(compiled.domains)}; {pad} is padding)",
                code="DG303",
            )
        if pad_mask is not None:
            pm = torch.as_tensor(pad_mask, device=dom.device)
            if pm.dim() == 1:
                pm = pm.unsqueeze(0)
            if pm.shape != dom.shape:
                raise LayoutError(f"pad_mask shape {tuple(pm.shape)} != domain_ids shape {tuple(dom.shape)}", code="DG306")
            dom = torch.where(pm.bool(), torch.full_like(dom, pad), dom)
        ids = None
        if input_ids is not None:
            ids = _as_long_2d(input_ids, "input_ids").to(dom.device)
            if ids.shape != dom.shape:
                raise LayoutError(f"input_ids shape {tuple(ids.shape)} != domain_ids shape {tuple(dom.shape)}", code="DG306")
        valid = dom != pad
        if end_with_generation:
            _check_ends_with_generation(compiled, dom, valid)
        index = torch.where(valid, valid.long().cumsum(1) - 1, torch.full_like(dom, -1))
        rank = torch.where(valid, _ranks(dom, pad + 1), torch.full_like(dom, -1))
        return cls(dom, index, _positions(compiled, index, rank, dom), rank, valid, ids, compiled)

    @classmethod
    def from_segments(
        cls,
        compiled,
        segments: Sequence,
        tokenizer=None,
        end_with_generation: bool = True,
        *,
        generation_token: int | None = None,
        device: torch.device | str | None = None,
    ) -> "Layout":
        """Layout from ``[(domain, text_or_ids), ...]`` (or a list of such lists, one per batch row).

        Rows are right-padded with ``pad_id``. With ``end_with_generation`` a row whose last
        segment is not of the generation domain gets one more token of that domain, with token
        id ``generation_token`` (else the tokenizer's BOS, else its EOS).
        """
        rows = [segments] if _is_single_row(segments) else list(segments)
        if not rows:
            raise LayoutError("from_segments needs at least one row", code="DG306")
        gen = compiled.generation_id
        if end_with_generation and gen is None:
            raise LayoutError(
                "end_with_generation needs a generation domain; the policy declares none",
                code="DG305",
                hint="Add `generation: {domain: NAME}` to the policy or pass end_with_generation=False.",
            )
        id_rows, dom_rows = [], []
        for r, row in enumerate(rows):
            ids: list[int] = []
            doms: list[int] = []
            for s, seg in enumerate(row):
                if not isinstance(seg, (tuple, list)) or len(seg) != 2:
                    raise LayoutError(f"segment {s} of row {r} must be (domain, text_or_ids), got {seg!r}", code="DG306")
                domain, content = seg
                d = _domain_id(compiled, domain, r)
                toks = _tokens(content, tokenizer, r, s)
                ids.extend(toks)
                doms.extend([d] * len(toks))
            if end_with_generation and (not doms or doms[-1] != gen):
                ids.append(_generation_token(generation_token, tokenizer))
                doms.append(gen)
            id_rows.append(ids)
            dom_rows.append(doms)
        n = max(len(d) for d in dom_rows)
        pad_token = getattr(tokenizer, "pad_token_id", None)
        pad_token = 0 if pad_token is None else int(pad_token)
        dom = torch.full((len(rows), n), compiled.pad_id, dtype=torch.long)
        inp = torch.full((len(rows), n), pad_token, dtype=torch.long)
        for r, (ids, doms) in enumerate(zip(id_rows, dom_rows)):
            dom[r, : len(doms)] = torch.tensor(doms, dtype=torch.long)
            inp[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if device is not None:
            dom, inp = dom.to(device), inp.to(device)
        return cls.from_ids(compiled, dom, end_with_generation=end_with_generation, input_ids=inp)

    # --- decode ----------------------------------------------------------------------------
    def extend(self, n_new: int, domain: int | str | None = None, *, input_ids=None) -> "Layout":
        """This layout with ``n_new`` tokens appended to every row (generation domain unless ``domain``).

        The new tokens follow each row's last valid token in sequence index, whatever padding
        sits between them in the tensor. ``input_ids`` [B, n_new] are the new tokens' ids; without
        them the result has ``input_ids=None``.
        """
        if n_new < 0:
            raise LayoutError(f"extend needs n_new >= 0, got {n_new}", code="DG306")
        if domain is None:
            d = self.compiled.generation_id
            if d is None:
                raise LayoutError("extend needs a domain: the policy declares no generation domain", code="DG305")
        else:
            d = _domain_id(self.compiled, domain, None)
        b, dev = self.batch_size, self.device
        steps = torch.arange(n_new, device=dev).expand(b, n_new)
        new_dom = torch.full((b, n_new), d, dtype=torch.long, device=dev)
        new_index = self.valid.long().sum(1, keepdim=True) + steps
        new_rank = (self.domain_ids == d).long().sum(1, keepdim=True) + steps
        ids = None
        if input_ids is not None:
            extra = _as_long_2d(input_ids, "input_ids").to(dev)
            if extra.shape != (b, n_new):
                raise LayoutError(f"input_ids for extend must be [{b}, {n_new}], got {tuple(extra.shape)}", code="DG306")
            if self.input_ids is not None:
                ids = torch.cat([self.input_ids, extra], 1)
        # Earlier tokens keep their positions (each counts only tokens before it); the new ones'
        # are counted here, as _positions would over the whole row.
        mode = getattr(self.compiled, "positions", "global")
        if mode == "reach":
            counts = _position_sources(self.compiled, dev)[d]  # bool [D+1]: which domains d counts
            counts_self = int(self.compiled.position_sources[d, d])
            new_pos = counts[self.domain_ids].long().sum(1, keepdim=True) + steps * counts_self
        else:
            new_pos = new_rank if mode == "per_domain" else new_index
        return Layout(
            domain_ids=torch.cat([self.domain_ids, new_dom], 1),
            index=torch.cat([self.index, new_index], 1),
            position_ids=torch.cat([self.position_ids, new_pos], 1),
            domain_rank=torch.cat([self.domain_rank, new_rank], 1),
            valid=torch.cat([self.valid, torch.ones_like(new_dom, dtype=torch.bool)], 1),
            input_ids=ids,
            compiled=self.compiled,
        )


# --- helpers -------------------------------------------------------------------------------


def query_columns(n: int, q_slice: slice | int | None) -> slice:
    """Normalise ``q_slice``: None → all N tokens; an int q → the last q tokens; a slice → itself (step 1)."""
    if q_slice is None:
        return slice(0, n)
    if isinstance(q_slice, int):
        if not 0 <= q_slice <= n:
            raise LayoutError(f"q_slice={q_slice} asks for more query tokens than the layout's {n}", code="DG306")
        return slice(n - q_slice, n)
    if isinstance(q_slice, slice):
        start, stop, step = q_slice.indices(n)
        if step != 1:
            raise LayoutError(f"q_slice must be contiguous (step 1), got step {step}", code="DG306")
        return slice(start, max(start, stop))
    raise LayoutError(f"q_slice must be None, an int or a slice, got {type(q_slice).__name__}", code="DG306")


def _positions(compiled, index: torch.Tensor, rank: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
    mode = getattr(compiled, "positions", "global")
    if mode == "reach":
        return _reach_positions(compiled, dom)
    pos = rank if mode == "per_domain" else index
    return pos.clamp_min(0)


_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _position_sources(compiled, device) -> torch.Tensor:
    """``compiled.position_sources`` on ``device``, copied there once (decoding extends a layout every step)."""
    device = torch.device(device)
    try:
        per_device = _SOURCES.setdefault(compiled, {})
    except TypeError:  # not weakly referenceable: copy every time
        return compiled.position_sources.to(device)
    if device not in per_device:
        per_device[device] = compiled.position_sources.to(device)
    return per_device[device]


def _reach_positions(compiled, dom: torch.Tensor) -> torch.Tensor:
    """Each token's count of earlier tokens (tensor order = sequence order for valid tokens) of the domains
    ``compiled.position_sources`` lets its domain count; 0 for padding. O(D·B·N) time, O(B·N) memory."""
    sources = _position_sources(compiled, dom.device)
    pos = torch.zeros_like(dom)
    for d in torch.unique(dom).tolist():
        if d == compiled.pad_id:
            continue
        counted = sources[d][dom].long()  # [B, N]: is each token of a domain that d counts?
        before = counted.cumsum(1) - counted
        pos = torch.where(dom == d, before, pos)
    return pos


def _check_ends_with_generation(compiled, dom: torch.Tensor, valid: torch.Tensor) -> None:
    gen = compiled.generation_id
    if gen is None:
        raise LayoutError(
            "end_with_generation needs a generation domain; the policy declares none",
            code="DG305",
        )
    n = dom.shape[1]
    # last valid column per row (-1 for an all-padding row)
    last = torch.where(valid, torch.arange(n, device=dom.device), torch.full_like(dom, -1)).amax(1)
    for row in range(dom.shape[0]):
        col = int(last[row])
        if col < 0 or int(dom[row, col]) != gen:
            got = "nothing (all padding)" if col < 0 else repr(compiled.domains[int(dom[row, col])])
            raise LayoutError(
                f"batch row {row} must end with a token of the generation domain "
                f"{compiled.domains[gen]!r}, but ends with {got}",
                code="DG304",
                hint="Append a generation-domain token, or build with Layout.from_segments (which appends one).",
            )


def _is_single_row(segments) -> bool:
    if not segments:
        return True
    first = segments[0]
    return isinstance(first, tuple) or (
        isinstance(first, list) and len(first) == 2 and isinstance(first[0], (str, int)) and not isinstance(first[0], bool)
    )


def _domain_id(compiled, domain, row: int | None) -> int:
    if isinstance(domain, str):
        return compiled.id_of(domain)
    if isinstance(domain, int) and not isinstance(domain, bool) and 0 <= domain < compiled.num_domains:
        return domain
    where = "" if row is None else f" in batch row {row}"
    raise LayoutError(
        f"domain {domain!r}{where} is not a declared domain (names: {', '.join(compiled.domains)}; "
        f"ids 0..{compiled.num_domains - 1})",
        code="DG303",
    )


def _tokens(content, tokenizer, row: int, seg: int) -> list[int]:
    if isinstance(content, str):
        if tokenizer is None:
            raise LayoutError(
                f"segment {seg} of row {row} is text but no tokenizer was given",
                code="DG307",
                hint="Pass tokenizer=..., or give token ids instead of text.",
            )
        if hasattr(tokenizer, "encode"):
            try:
                out = tokenizer.encode(content, add_special_tokens=False)
            except TypeError:
                out = tokenizer.encode(content)
        else:
            out = tokenizer(content)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]
    t = content if isinstance(content, torch.Tensor) else torch.as_tensor(list(content), dtype=torch.long)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise LayoutError(f"segment {seg} of row {row}: token ids must be a flat sequence of ints", code="DG306")
    return [int(x) for x in t.tolist()]


def _generation_token(explicit: int | None, tokenizer) -> int:
    if explicit is not None:
        return int(explicit)
    for name in ("bos_token_id", "eos_token_id"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            return int(tok)
    raise LayoutError(
        "the prompt must end with a generation-domain token, but no token id is known for it",
        code="DG306",
        hint="Pass generation_token=ID (or a tokenizer with a BOS/EOS token).",
    )
