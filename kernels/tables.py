"""Frozen tables: the relation and patterns a kernel enforces, as compile-time constants.

A ``FrozenTables`` is built once from a compiled policy and a layer: the relation, the
causal flags and each query domain's pattern parts (window, dilation, stride,
block-local, global tokens, seeded random links). Its fields are
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


# Per-id pattern constants (``FrozenTables.pattern``), PATTERN_FIELDS ints per id:
#   reach   window width x dilation (0: no bound), dil: window/dilation part present (its
#   dilation, >= 1) or 0; stride (0: none); block (block_local size, 0: none); hubs
#   (global_tokens, 0: none); links (random links per query, 0: none); seed_term (the
#   seed's term of ``patterns.link_hash``, precomputed).
PATTERN_FIELDS = 7


@dataclass(frozen=True)
class FrozenTables:
    """Relation and pattern constants for one (policy, layer, head-set)."""

    num_domains: int  # D; the pad id is D and reads / is read by nobody
    rel_bits: tuple[int, ...]  # [D+1]: bit s of rel_bits[r] set iff readers of r may read s
    causal_bits: int  # bit r set iff queries of domain r are causal
    layer: int
    tables_digest: str  # compiled.tables_digest this was taken from
    # [(D+1) * PATTERN_FIELDS]: the union parts of each query domain's pattern (all 0: none)
    pattern: tuple[int, ...] = ()

    @property
    def dp(self) -> int:
        """Number of ids including the pad id."""
        return self.num_domains + 1

    @cached_property
    def has_pattern(self) -> bool:
        """Some domain's queries have pattern parts beyond ``causal`` (the kernels then apply them)."""
        return any(self.pattern)

    @cached_property
    def pattern_constants(self) -> tuple[int, ...]:
        """What the kernels take as ``PAT``: ``pattern`` (zeros when there is none), then the
        most random links any domain has (the bound of a static loop), then a bit set of the
        parts some domain uses (1 bounded window, 2 dilation > 1, 4 stride, 8 block-local,
        16 global tokens), so the kernels compile only those."""
        f = self.pattern or (0,) * (self.dp * PATTERN_FIELDS)
        col = lambda i: f[i::PATTERN_FIELDS]  # noqa: E731
        flags = (any(col(0)), any(d > 1 for d in col(1)), any(col(2)), any(col(3)), any(col(4)))
        used = sum(1 << i for i, on in enumerate(flags) if on)
        return (*f, max(col(5), default=0), used)

    def allowed(self, reader: int, source: int) -> bool:
        return bool((self.rel_bits[reader] >> source) & 1)

    @cached_property
    def _digest(self) -> str:
        payload = json.dumps(
            {
                "num_domains": self.num_domains,
                "rel_bits": list(self.rel_bits),
                "causal_bits": self.causal_bits,
                "pattern": list(self.pattern_constants),
                "layer": self.layer,
                "tables": self.tables_digest,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def digest(self) -> str:
        """sha256 over the constants (cached: the tables are immutable)."""
        return self._digest


def pattern_fields(rule) -> tuple[int, ...]:
    """The PATTERN_FIELDS constants of a ``patterns.MaskRule``'s union parts."""
    from domainguard.patterns import BlockLocal, GlobalTokens, RandomLinks, Strided, Window, link_seed_term

    reach = dil = stride = block = hubs = links = seed_term = 0
    if any(isinstance(part, Window) and part.width is None and part.dilation == 1 for part in rule.union):
        return (0,) * PATTERN_FIELDS  # that part keeps every pair, so the union does: no pattern
    if not rule.dense:
        for part in rule.union:
            if isinstance(part, Window):
                dil = part.dilation
                reach = 0 if part.width is None else part.width * part.dilation
            elif isinstance(part, Strided):
                stride = part.stride
            elif isinstance(part, BlockLocal):
                block = part.size
            elif isinstance(part, GlobalTokens):
                hubs = part.count
            elif isinstance(part, RandomLinks):
                links = part.links
                seed_term = link_seed_term(part.seed)
            else:  # a new part must be taught to the kernels before they run it
                raise KernelError(f"pattern part {type(part).__name__} has no kernel form", code="DG315")
    fields = (reach, dil, stride, block, hubs, links, seed_term)
    if rule.union and not rule.dense and not any(fields):
        # All zeros means "no pattern" to the kernels; this union keeps nothing instead.
        raise KernelError("a pattern whose parts keep no pair has no kernel form", code="DG315",
                          hint="drop the pattern, or run attention(..., backend='reference')")
    big = [v for v in fields[:6] if v >= 1 << 31]
    if big:
        raise KernelError(f"pattern value {big[0]} does not fit the kernels' 32-bit integers (at most {(1 << 31) - 1})",
                          code="DG320", hint="use a smaller window/dilation/stride/block_local/global_tokens/links, "
                          "or run attention(..., backend='reference')")
    return fields


def freeze(compiled, layer: int) -> FrozenTables:
    """Copy ``compiled``'s relation, causal flags and patterns at ``layer`` into constants.

    Raises KernelError DG313 for more than 63 domains and DG315 for patterns that differ
    between heads (the kernels enforce one mask for all heads; use the reference path).
    """
    from domainguard.patterns import representative_heads, rule_for

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
    pattern: list[int] = []
    for r in range(d):
        rule = rule_for(compiled.pattern(r, layer))
        for head in representative_heads(compiled):
            if rule_for(compiled.pattern(r, layer, head)) != rule:
                raise KernelError(
                    f"patterns of domain {compiled.domains[r]!r} at layer {layer} differ between heads; "
                    f"the kernels enforce one mask for all heads",
                    code="DG315",
                    hint="run attention(..., backend='reference') for this policy",
                )
        if rule.causal:
            causal |= 1 << r
        pattern.extend(pattern_fields(rule))
    pattern.extend([0] * PATTERN_FIELDS)  # the pad id: nobody reads it, it reads nothing
    return FrozenTables(
        num_domains=d,
        rel_bits=tuple(rel_bits),
        causal_bits=causal,
        layer=layer,
        tables_digest=compiled.tables_digest,
        pattern=tuple(pattern) if any(pattern) else (),
    )
