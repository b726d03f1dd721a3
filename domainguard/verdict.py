"""Verdicts are never booleans: PROVED, REFUTED(witness) or UNKNOWN(reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    PROVED = "PROVED"
    REFUTED = "REFUTED"
    UNKNOWN = "UNKNOWN"

    def __str__(self) -> str:
        return self.value


def combine_status(statuses) -> Status:
    """REFUTED beats UNKNOWN beats PROVED; nothing at all is UNKNOWN."""
    statuses = list(statuses)
    if not statuses:
        return Status.UNKNOWN
    if Status.REFUTED in statuses:
        return Status.REFUTED
    if Status.UNKNOWN in statuses:
        return Status.UNKNOWN
    return Status.PROVED


@dataclass(frozen=True)
class Step:
    """A domain holding the information at a level; ``via`` says how it got there."""

    domain: str
    level: int
    via: str  # "origin" | "attention" | "decode"

    def to_dict(self) -> dict:
        return {"domain": self.domain, "level": self.level, "via": self.via}


@dataclass(frozen=True)
class Path:
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        out = ""
        for i, st in enumerate(self.steps):
            if i == 0:
                out = f"{st.domain}@{st.level}"
            elif st.via == "decode":
                out += f" ↻ {st.domain}@{st.level}"
            else:
                out += f" → {st.domain}@{st.level}"
        return out

    def to_dict(self) -> dict:
        return {"text": str(self), "steps": [s.to_dict() for s in self.steps]}


@dataclass(frozen=True)
class Result:
    """The outcome of one claim: a status, its witness paths or its reason."""

    id: str
    kind: str
    statement: str
    status: Status
    method: dict[str, Any]
    scope: dict[str, Any]
    witness: tuple[Path, ...] = ()
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_claim(self) -> dict:
        claim = {
            "id": self.id,
            "kind": self.kind,
            "statement": self.statement,
            "scope": self.scope,
            "method": self.method,
            "status": self.status.value,
            "details": self.details,
        }
        if self.witness:
            claim["witness"] = [p.to_dict() for p in self.witness]
        if self.reason:
            claim["reason"] = self.reason
        return claim


@dataclass(frozen=True)
class Verdict:
    """The result of ``dg.verify``: overall status, one Result per claim, reach table, findings."""

    status: Status
    results: tuple[Result, ...]
    reach: dict[str, list[str]]
    findings: tuple[dict, ...] = ()
    suggestion: dict | None = None

    @property
    def witnesses(self) -> list[Path]:
        return [p for r in self.results for p in r.witness]

    @property
    def proved(self) -> bool:
        return self.status is Status.PROVED

    def result(self, rule_id: str) -> Result:
        for r in self.results:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)
