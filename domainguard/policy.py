"""The policy data model: pure, frozen, strict pydantic models (no I/O).

This is the raw, user-facing form of DESIGN §2. ``parse`` turns YAML into it and
``flow`` resolves it (tree expansion, overrides, profiles) into per-layer relations.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, field_validator

SCHEMA_VERSION = 1

DomainName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$", min_length=1, max_length=128)
]
LayerRange = Annotated[str, StringConstraints(pattern=r"^\s*\d+\s*(-\s*\d*\s*)?$")]

RESERVED_NAMES = frozenset({"default", "pad"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


class Domain(_Model):
    """A node of the domain tree."""

    description: str | None = None
    children: dict[DomainName, "Domain"] = Field(default_factory=dict)


class Reads(_Model):
    """Long form of a reads entry: sources plus whether the reader reads itself."""

    sources: list[DomainName] = Field(default_factory=list)
    self_: bool = Field(True, alias="self")


ReadsValue = Union[list[DomainName], Reads]


class Flow(_Model):
    from_: DomainName = Field(alias="from")
    to: DomainName


class ForbidFlow(_Model):
    """No information path of any length from ``from`` (or a descendant) to ``to``."""

    flow: Flow
    description: str | None = None


class ForbidCombine(_Model):
    """No hidden state anywhere may depend on both domains."""

    combine: list[DomainName] = Field(min_length=2, max_length=2)
    description: str | None = None


class ForbidIsolate(_Model):
    """No path in either direction between the two domains."""

    isolate: list[DomainName] = Field(min_length=2, max_length=2)
    description: str | None = None


ForbidRule = Union[ForbidFlow, ForbidCombine, ForbidIsolate]


class RandomLinks(_Model):
    """BigBird-style seeded random long-range links: ``links`` keys per query."""

    links: int = Field(gt=0)
    seed: int = 0


class Pattern(_Model):
    """Sparsity inside what ``reads`` allows; it can only remove token pairs.

    ``causal`` restricts; the other fields are the parts of a sparse pattern whose
    union is kept (window, strided, block-local, global tokens, random links). A
    pattern with none of them keeps every pair that ``causal`` keeps.
    """

    causal: bool | None = None
    window: int | None = Field(None, gt=0)
    dilation: int | None = Field(None, gt=0)
    stride: int | None = Field(None, gt=0)
    block_local: int | None = Field(None, gt=0)
    global_tokens: int | None = Field(None, gt=0)  # 0 hubs would make a part that keeps nothing
    random: RandomLinks | None = None
    layers: LayerRange | None = None
    heads: LayerRange | None = None


PatternValue = Union[Pattern, list[Pattern]]


class LayerOverride(_Model):
    """Replaces the sources of the readers it lists, for the layers in ``layers``."""

    layers: LayerRange
    reads: dict[DomainName, ReadsValue] = Field(default_factory=dict)
    description: str | None = None


class Profile(_Model):
    """A deployment profile: replaces the sources of the readers it lists; may only tighten."""

    description: str | None = None
    reads: dict[DomainName, ReadsValue] = Field(default_factory=dict)


class Generation(_Model):
    domain: DomainName


class Policy(_Model):
    """A whole domain policy (DESIGN §2)."""

    domainguard: Literal[1]
    name: str = Field(min_length=1)
    description: str | None = None
    domains: dict[DomainName, Domain] = Field(min_length=1)
    reads: dict[DomainName, ReadsValue] = Field(default_factory=dict)
    forbid: list[ForbidRule] = Field(default_factory=list)
    layers: list[LayerOverride] = Field(default_factory=list)
    patterns: dict[DomainName, PatternValue] = Field(default_factory=dict)
    profiles: dict[DomainName, Profile] = Field(default_factory=dict)
    generation: Generation | None = None
    # global: sequence index. per_domain: rank among the token's own domain. reach: rank among the tokens of
    # the domains the token may hold from layer 0 on (its own; for the generation domain, all it may read).
    positions: Literal["global", "per_domain", "reach"] = "global"
    num_layers: int | None = Field(None, gt=0, description="Model depth, if the policy fixes it.")

    # Where each part came from (a parse.SourceMap), for errors that name file:line:column.
    _source: object = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name_is_one_line(cls, v: str) -> str:
        # Printed in verdicts, reports and logs: no line breaks or terminal control sequences in it.
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in v):
            raise ValueError("name must be one line of printable text (no control characters)")
        return v


Domain.model_rebuild()


def parse_layer_range(text: str, num_layers: int | None = None) -> range:
    """``"0-3"`` → layers 0..3; ``"5"`` → 5; ``"8-"`` → 8..num_layers-1."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?", text)
    if m is None:
        raise ValueError(f"bad layer range {text!r}; write 'A-B', 'A' or 'A-'")
    lo = int(m.group(1))
    if m.group(2) is None:
        hi = lo
    elif m.group(3):
        hi = int(m.group(3))
    else:
        if num_layers is None:
            raise ValueError(f"open layer range {text!r} needs the model's layer count")
        if lo > num_layers - 1:
            raise ValueError(f"open layer range {text!r} starts past the model's last layer ({num_layers - 1})")
        hi = num_layers - 1
    if hi < lo:
        raise ValueError(f"layer range {text!r} runs backwards")
    return range(lo, hi + 1)


def json_schema() -> dict:
    """JSON Schema of the policy file, for YAML editors."""
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "domainguard policy"
    return schema
