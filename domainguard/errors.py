"""Typed errors with stable codes, formatted once at the CLI edge.

Every error a user can cause carries a stable ``code`` (``DG1xx`` policy, ``DG2xx``
proofs, ``DG3xx`` kernels and layouts, ``DG4xx`` bundles, ``DG5xx`` models) and, where
it comes from a file, the file, line and column it points at, plus one sentence on
how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A point in a source file: 1-based line and column."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


class DomainGuardError(Exception):
    """Base of every error domainguard raises on purpose."""

    code = "DG000"
    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        location: Location | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.location = location
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        # The message is a sentence of its own even where it quotes a library's text without a stop.
        stop = "" if not self.hint or self.message.rstrip().endswith((".", "!", "?", ":")) else "."
        hint = f" {self.hint}" if self.hint else ""
        return f"{where}error {self.code}: {self.message}{stop}{hint}"

    def to_dict(self) -> dict:
        loc = self.location
        return {
            "error": type(self).__name__,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "file": loc.file if loc else None,
            "line": loc.line if loc else None,
            "column": loc.column if loc else None,
        }


class PolicyError(DomainGuardError):
    """A policy file is malformed or inconsistent."""

    code = "DG100"


class ProofError(DomainGuardError):
    """A proof could not be set up (not a REFUTED or UNKNOWN verdict: those are results)."""

    code = "DG200"


class LayoutError(DomainGuardError):
    """Token domain ids do not fit the compiled policy."""

    code = "DG300"


class KernelError(DomainGuardError):
    """A kernel was asked for something it does not support."""

    code = "DG310"


class BundleError(DomainGuardError):
    """A compiled directory or certified bundle is missing, malformed or tampered with."""

    code = "DG400"


class ModelError(DomainGuardError):
    """A model cannot be guarded (unknown architecture, sequence-mixing ops, ...)."""

    code = "DG500"
