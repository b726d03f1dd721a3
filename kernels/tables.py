"""Frozen tables: the relation and patterns a kernel enforces, as compile-time constants.

A ``FrozenTables`` is built once from a compiled policy and a layer. Its fields are
passed to the Triton kernels as ``tl.constexpr`` values, so they are baked into the
compiled binary: no runtime argument (tensor or scalar) can widen the relation a
launched kernel applies. ``digest()`` covers exactly these constants.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

from domainguard.errors import KernelError

# One bit per source domain in a 64-bit word per reader: the pad id is one more domain.
MAX_DOMAINS = 63


@dataclass(frozen=True)
class FrozenTables:
    """Relation and pattern constants for one (policy, layer, head-set)."""

    num_domains: int  # D; the pad id is D and reads / is read by nobody
    rel_bits: tuple[int, ...]  # [D+1]: bit s of rel_bits[r] set iff readers of r may read s
    causal_bits: int  # bit r set iff queries of domain r are causal
    layer: int
    tables_digest: str  # compiled.tables_digest this was taken from

    @property
    def dp(self) -> int:
        """Number of ids including the pad id."""
        return self.num_domains + 1

    def allowed(self, reader: int, source: int) -> bool:
        return bool((self.rel_bits[reader] >> source) & 1)

    @cached_property
    def _digest(self) -> str:
        payload = json.dumps(
            {
                "num_domains": self.num_domains,
                "rel_bits": list(self.rel_bits),
                "causal_bits": self.causal_bits,
                "layer": self.layer,
                "tables": self.tables_digest,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def digest(self) -> str:
        """sha256 over the constants (cached: the tables are immutable)."""
        return self._digest


def _pattern_is_plain(pat) -> bool:
    """True when a pattern is at most ``causal`` (the parts the kernels implement)."""
    if pat is None:
        return True
    return all(
        getattr(pat, name) in (None, 0)
        for name in ("window", "dilation", "stride", "block_local", "global_tokens", "random")
    )


def _pattern_heads(compiled) -> tuple[int, ...]:
    """Heads that between them show every per-head pattern choice (see patterns.representative_heads)."""
    from domainguard.patterns import representative_heads

    return representative_heads(compiled)


def freeze(compiled, layer: int) -> FrozenTables:
    """Copy ``compiled``'s relation (and causal flags) at ``layer`` into constants.

    Raises KernelError DG313 for more than 63 domains and DG315 for pattern parts the
    kernels do not implement (use the reference path for those).
    """
    d = compiled.num_domains
    if d > MAX_DOMAINS:
        raise KernelError(
            f"policy has {d} domains; the kernels support at most {MAX_DOMAINS}", code="DG313"
        )
    rel = compiled.relation(layer)  # [D+1, D+1] bool with pad row/col False
    rel_bits = []
    for r in range(d + 1):
        word = 0
        for s in range(d + 1):
            if bool(rel[r, s]):
                word |= 1 << s
        rel_bits.append(word)
    causal = 0
    for r in range(d):
        pat = compiled.pattern(r, layer)
        if not _pattern_is_plain(pat):
            raise KernelError(
                f"pattern of domain {compiled.domains[r]!r} at layer {layer} uses parts the kernels do not "
                f"implement yet (only 'causal')",
                code="DG315",
                hint="run attention(..., backend='reference') for this policy",
            )
        if pat is not None and pat.causal:
            causal |= 1 << r
        for head in _pattern_heads(compiled):
            other = compiled.pattern(r, layer, head)
            if bool(other is not None and other.causal) != bool(pat is not None and pat.causal) or not _pattern_is_plain(other):
                raise KernelError(
                    f"patterns of domain {compiled.domains[r]!r} at layer {layer} differ between heads; "
                    f"the kernels enforce one mask for all heads",
                    code="DG315",
                    hint="run attention(..., backend='reference') for this policy",
                )
    return FrozenTables(
        num_domains=d,
        rel_bits=tuple(rel_bits),
        causal_bits=causal,
        layer=layer,
        tables_digest=compiled.tables_digest,
    )
