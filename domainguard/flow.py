"""Policy → FlowSpec: the domain tree in pre-order and one domain relation per layer.

Resolution order for layer l under profile P (DESIGN §2 "Overrides"): base ``reads``,
then the profile's entries, then the ``layers`` entries covering l; each step
replaces the sources of exactly the readers it lists. A reads entry ``R: [S]``
lets every domain in subtree(R) attend every domain in subtree(S); a domain reads
itself unless its entry (or an ancestor's) says ``self: false``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import PolicyError
from .parse import locate
from .policy import Domain, Policy, Reads, parse_layer_range


@dataclass(frozen=True, eq=False)
class DomainTree:
    """Domains in pre-order: subtree(i) is the id range [i, ends[i])."""

    names: tuple[str, ...]
    parents: tuple[int, ...]
    ends: tuple[int, ...]

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def subtree(self, i: int) -> range:
        return range(i, self.ends[i])

    def ancestors_or_self(self, i: int) -> list[int]:
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out

    def children(self, i: int) -> list[int]:
        return [c for c in self.subtree(i) if self.parents[c] == i]

    @classmethod
    def build(cls, domains: dict[str, Domain]) -> "DomainTree":
        names: list[str] = []
        parents: list[int] = []
        ends: list[int] = []

        def visit(name: str, node: Domain, parent: int) -> None:
            i = len(names)
            names.append(name)
            parents.append(parent)
            ends.append(-1)
            for child, sub in node.children.items():
                visit(child, sub, i)
            ends[i] = len(names)

        for name, node in domains.items():
            visit(name, node, -1)
        return cls(tuple(names), tuple(parents), tuple(ends))


@dataclass(frozen=True)
class ReadAtom:
    """One reads entry as it takes effect: subtree(reader) may attend subtree(source) at ``layers``."""

    reader: int
    source: int
    layers: tuple[int, ...]
    origin: tuple  # path of the entry in the policy document, e.g. ("reads", "answer", 1)

    @property
    def origin_text(self) -> str:
        head, *rest = self.origin
        out = str(head)
        for part in rest:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out


@dataclass(frozen=True, eq=False)
class FlowSpec:
    """Per-layer domain relations for one model depth and profile."""

    tree: DomainTree
    num_layers: int
    depth_given: bool  # False: no depth was named, so verdicts are for unbounded depth
    profile: str | None
    generation: int | None
    relations: np.ndarray  # bool [L, D, D], [l, reader, source], read-only
    atoms: tuple[ReadAtom, ...]
    layer_config: tuple[int, ...]  # layers with equal config share an id (same relation)

    @cached_property
    def union(self) -> np.ndarray:
        """bool [D, D]: pairs allowed in some layer."""
        u = self.relations.any(axis=0)
        u.setflags(write=False)
        return u


def _sources(value: list[str] | Reads) -> tuple[list[str], bool, tuple]:
    if isinstance(value, Reads):
        return list(value.sources), value.self_, ("sources",)
    return list(value), True, ()


def _policy_error(policy: Policy, msg: str, path: tuple, code: str, hint: str, key: bool = False) -> PolicyError:
    return PolicyError(msg, code=code, location=locate(policy, path, key=key), hint=hint)


# Deeper than any transformer shipped; the verifier's work grows with depth, so a typo must not hang it.
MAX_LAYERS = 4096


def _depth(policy: Policy, num_layers: int | None) -> tuple[int, bool]:
    if num_layers is not None:
        if not 1 <= num_layers <= MAX_LAYERS:
            raise PolicyError(f"--layers must be between 1 and {MAX_LAYERS}, got {num_layers}", code="DG107",
                              hint="Give the model's number of transformer layers.")
        if policy.num_layers is not None and policy.num_layers != num_layers:
            raise _policy_error(policy, f"the policy fixes num_layers: {policy.num_layers}, but the depth asked for "
                                f"(--layers, or the model's layer count) is {num_layers}", ("num_layers",), "DG107",
                                "Make `num_layers:` the model's depth (or drop --layers): verdicts at another depth "
                                "may differ.")
        return num_layers, True
    if policy.num_layers is not None:
        if policy.num_layers > MAX_LAYERS:
            raise _policy_error(policy, f"num_layers must be at most {MAX_LAYERS}, got {policy.num_layers}",
                                ("num_layers",), "DG107", "Give the model's number of transformer layers.")
        return policy.num_layers, True
    # No depth named: verdicts are for a model of any depth. The tables cover every layer the
    # policy's overrides name and one layer more, without overrides: it stands for every layer
    # a deeper model has beyond them, where the base reads (and profile) apply. Without it, a
    # reader whose base entry every named layer overrides would leave that entry out of the
    # any-depth closure and of the profile proofs, though every deeper layer uses it.
    top = 0
    for i, ov in enumerate(policy.layers):
        try:
            top = max(top, parse_layer_range(ov.layers).stop)
        except ValueError:
            raise _policy_error(policy, f"open layer range {ov.layers!r} needs the model's depth",
                                ("layers", i, "layers"), "DG107", "Pass --layers N or set `num_layers:`.") from None
        if top > MAX_LAYERS:
            raise _policy_error(policy, f"layer range {ov.layers!r} goes past layer {MAX_LAYERS - 1}",
                                ("layers", i, "layers"), "DG107", f"Use layers within 0-{MAX_LAYERS - 1}.")
    return top + 1, False


def resolve(policy: Policy, num_layers: int | None = None, profile: str | None = None, source: str | None = None) -> FlowSpec:
    """Resolve the tree, profile and per-layer overrides into one relation per layer."""
    tree = DomainTree.build(policy.domains)
    D = len(tree.names)
    L, depth_given = _depth(policy, num_layers)

    base: dict[str, tuple] = {k: (v, ("reads", k)) for k, v in policy.reads.items()}
    if profile is not None:
        if profile not in policy.profiles:
            known = ", ".join(policy.profiles) or "none"
            raise PolicyError(f"unknown profile {profile!r} (profiles: {known})", code="DG112",
                              location=locate(policy, ("profiles",), key=True),
                              hint="Use one of the profiles the policy declares.")
        for k, v in policy.profiles[profile].reads.items():
            base[k] = (v, ("profiles", profile, "reads", k))

    # Which overrides cover each layer; two covering one layer may not name the same reader.
    covering: list[list[int]] = [[] for _ in range(L)]
    for i, ov in enumerate(policy.layers):
        try:
            rng = parse_layer_range(ov.layers, L)
        except ValueError as exc:
            raise _policy_error(policy, f"{exc} (the model has layers 0..{L - 1})", ("layers", i, "layers"), "DG107",
                                f"Use layers within 0-{L - 1} or pass the right --layers.") from None
        if rng.stop > L:
            raise _policy_error(policy, f"layer range {ov.layers!r} lies outside the model's layers 0..{L - 1}",
                                ("layers", i, "layers"), "DG107", f"Use layers within 0-{L - 1} or pass the right --layers.")
        for layer in rng:
            for j in covering[layer]:
                both = set(policy.layers[j].reads) & set(ov.reads)
                if both:
                    raise _policy_error(
                        policy, f"layers entries {j} and {i} both set {sorted(both)[0]!r} at layer {layer}",
                        ("layers", i, "layers"), "DG115", "Make the layer ranges disjoint for that reader.")
            covering[layer].append(i)

    configs: dict[tuple[int, ...], int] = {}
    layer_config = tuple(configs.setdefault(tuple(c), len(configs)) for c in covering)

    relations = np.zeros((L, D, D), dtype=bool)
    atom_layers: dict[tuple, list[int]] = {}
    atom_ends: dict[tuple, tuple[int, int]] = {}
    for cover, cid in configs.items():
        layers = [l for l in range(L) if layer_config[l] == cid]
        reads = dict(base)
        for i in cover:
            for k, v in policy.layers[i].reads.items():
                reads[k] = (v, ("layers", i, "reads", k))
        rel = np.zeros((D, D), dtype=bool)
        for k, (v, path) in reads.items():
            srcs, _, sub = _sources(v)
            rk = tree.subtree(tree.index[k])
            for j, s in enumerate(srcs):
                rs = tree.subtree(tree.index[s])
                rel[rk.start:rk.stop, rs.start:rs.stop] = True
                key = path + sub + (j,)
                atom_layers.setdefault(key, []).extend(layers)
                atom_ends[key] = (rk.start, rs.start)
        # Domains not under a self:false entry keep their diagonal.
        keep = np.ones(D, dtype=bool)
        for k, (v, _) in reads.items():
            if not _sources(v)[1]:
                keep[tree.subtree(tree.index[k]).start:tree.ends[tree.index[k]]] = False
        idx = np.flatnonzero(keep)
        rel[idx, idx] = True
        relations[layers] = rel

    relations.setflags(write=False)
    atoms = tuple(
        ReadAtom(reader=atom_ends[k][0], source=atom_ends[k][1], layers=tuple(sorted(v)), origin=k)
        for k, v in atom_layers.items()
    )
    gen = tree.index[policy.generation.domain] if policy.generation is not None else None
    return FlowSpec(tree, L, depth_given, profile, gen, relations, atoms, layer_config)
