"""CompiledPolicy: the resolved, frozen form every later stage consumes.

Domain ids are positions in ``domains`` (pre-order of the domain tree, so every
subtree is a contiguous id interval). One extra id, ``pad_id == len(domains)``,
marks padding: nobody reads it and it reads nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import LayoutError
from .flow import FlowSpec, resolve
from .policy import Pattern, Policy, parse_layer_range


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy resolved for a model depth and a deployment profile."""

    policy: Policy
    flow: FlowSpec
    source: str | None = None
    _patterns: dict = field(default_factory=dict, repr=False)

    # --- names and ids -------------------------------------------------------------
    @property
    def domains(self) -> tuple[str, ...]:
        return self.flow.tree.names

    @property
    def num_domains(self) -> int:
        return len(self.flow.tree.names)

    @property
    def pad_id(self) -> int:
        return len(self.flow.tree.names)

    @property
    def num_layers(self) -> int:
        return self.flow.num_layers

    @property
    def profile(self) -> str | None:
        return self.flow.profile

    @property
    def generation_id(self) -> int | None:
        return self.flow.generation

    @property
    def positions(self) -> str:
        return self.policy.positions

    @cached_property
    def position_sources(self) -> "torch.Tensor":
        """bool [D+1, D+1]: [n, s] when ``positions: reach`` counts tokens of domain s for a token of domain n
        (padding counts nothing and is counted by nothing)."""
        import torch

        from .verify import entry_table

        table = torch.zeros(self.pad_id + 1, self.pad_id + 1, dtype=torch.bool)
        table[: self.pad_id, : self.pad_id] = torch.from_numpy(entry_table(self.flow))
        return table

    def id_of(self, name: str) -> int:
        try:
            return self.flow.tree.index[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.domains), n=1) if isinstance(name, str) else []
            raise LayoutError(
                f"unknown domain {name!r}; declared domains: {', '.join(self.domains)}",
                code="DG301",
                hint=f"Did you mean {close[0]!r}?" if close else "Use one of the declared domains.",
            ) from None

    # --- relations -----------------------------------------------------------------
    @property
    def relations(self) -> np.ndarray:
        """bool [L, D, D], read-only: ``relations[l, r, s]`` — at layer l, tokens of r may attend tokens of s."""
        return self.flow.relations

    def relation(self, layer: int):
        """torch.bool [D+1, D+1] for ``layer`` including the pad row/column (all False)."""
        import torch

        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer {layer} outside 0..{self.num_layers - 1}", code="DG302")
        d = self.num_domains
        out = torch.zeros(d + 1, d + 1, dtype=torch.bool)
        out[:d, :d] = torch.from_numpy(self.relations[layer].copy())
        return out

    # --- patterns ------------------------------------------------------------------
    def pattern(self, domain: int, layer: int, head: int = 0) -> Pattern | None:
        """Pattern for queries of ``domain`` at ``layer``/``head``: the nearest ancestor's entry, else ``default``."""
        key = (domain, layer, head)
        if key in self._patterns:
            return self._patterns[key]
        tree = self.flow.tree
        pats = self.policy.patterns
        chosen = None
        node = domain if domain < self.num_domains else -1
        candidates = []
        while node >= 0:
            candidates.append(tree.names[node])
            node = tree.parents[node]
        candidates.append("default")
        for name in candidates:
            value = pats.get(name)
            if value is None:
                continue
            for pat in value if isinstance(value, list) else [value]:
                if pat.layers is not None and layer not in _layers_of(pat.layers, self.num_layers):
                    continue
                if pat.heads is not None and head not in parse_layer_range(pat.heads, 1 << 30):
                    continue
                chosen = pat
                break
            if chosen is not None:
                break
        self._patterns[key] = chosen
        return chosen

    # --- digests -------------------------------------------------------------------
    @cached_property
    def canonical_policy(self) -> str:
        """The policy as canonical JSON: aliases, defaults dropped, keys sorted — except the
        names in the domain tree, whose declaration order is the domain ids' order (so the
        canonical form compiles to the same tables as the source)."""
        data = self.policy.model_dump(mode="json", by_alias=True, exclude_none=True)
        return json.dumps(_canonical_policy_data(data), separators=(",", ":"), ensure_ascii=False)

    @cached_property
    def tables_digest(self) -> str:
        """sha256 over the domain names, layer count, profile and relation tables."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.domains), self.num_layers, self.profile]).encode())
        h.update(np.packbits(self.relations, axis=None).tobytes())
        return h.hexdigest()

    @cached_property
    def policy_digest(self) -> str:
        return hashlib.sha256(self.canonical_policy.encode()).hexdigest()


def _canonical_order(value):
    """Sort mapping keys recursively."""
    if isinstance(value, dict):
        return {k: _canonical_order(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical_order(v) for v in value]
    return value


def _canonical_policy_data(data: dict) -> dict:
    """Keys sorted, except the domain tree's names, which keep their declaration order."""
    def tree(names: dict) -> dict:
        return {name: {k: tree(v) if k == "children" else _canonical_order(v) for k, v in sorted(node.items())}
                for name, node in names.items()}

    return {k: tree(v) if k == "domains" else _canonical_order(v) for k, v in sorted(data.items())}


def compile(policy: Policy, layers: int | None = None, profile: str | None = None, *, source: str | None = None) -> CompiledPolicy:
    """Resolve ``policy`` for a model of ``layers`` layers under deployment ``profile``."""
    flow = resolve(policy, num_layers=layers, profile=profile, source=source)
    if flow.depth_given:  # without a depth, a pattern's layers may lie in the deeper model's layers
        _check_pattern_layers(policy, flow.num_layers)
    return CompiledPolicy(policy=policy, flow=flow, source=source)


def _layers_of(text: str, num_layers: int) -> range:
    """The layers of ``text`` within a model of ``num_layers`` (none where it lies beyond them: a policy
    compiled without a depth)."""
    try:
        return parse_layer_range(text, num_layers)
    except ValueError:
        return range(0)


def _check_pattern_layers(policy: Policy, num_layers: int) -> None:
    """Every pattern's ``layers:`` lies within the model's layers (as every override's must)."""
    from .errors import PolicyError
    from .parse import locate

    for name, value in policy.patterns.items():
        for j, pat in enumerate(value if isinstance(value, list) else [value]):
            if pat.layers is None:
                continue
            path = ("patterns", name) + ((j,) if isinstance(value, list) else ()) + ("layers",)
            try:
                rng = parse_layer_range(pat.layers, num_layers)
                problem = None if rng.stop <= num_layers else \
                    f"layer range {pat.layers!r} lies outside the model's layers 0..{num_layers - 1}"
            except ValueError as exc:
                problem = str(exc)
            if problem:
                raise PolicyError(problem, code="DG107", location=locate(policy, path),
                                  hint=f"Use layers within 0-{num_layers - 1} or pass the right --layers.")
