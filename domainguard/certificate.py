"""certificate.json: what was proved, about which artifact, how, and under which assumptions (DESIGN §7)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BundleError

FORMAT = "domainguard-certificate/1"
StatusName = Literal["PROVED", "REFUTED", "UNKNOWN"]


class Method(BaseModel):
    """How a claim was established."""

    model_config = ConfigDict(extra="allow")

    name: str  # "graph-search" | "z3" | "exhaustive" | "empirical" | "trace"
    version: str | None = None
    seconds: float | None = None


class Claim(BaseModel):
    """One claim with its scope, method and result."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    statement: str
    scope: dict[str, Any] = Field(default_factory=dict)
    method: Method
    status: StatusName
    witness: list[Any] | None = None
    reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    severity: Literal["info", "warning", "error"]
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Certificate(BaseModel):
    """The whole certificate; ``verdict`` is derived from the claims, never set by hand."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["domainguard-certificate/1"] = FORMAT
    verdict: StatusName = "UNKNOWN"
    subject: dict[str, Any] = Field(default_factory=dict)
    tools: dict[str, str | None] = Field(default_factory=dict)
    scope: dict[str, Any] = Field(default_factory=dict)
    claims: list[Claim] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    assumptions: list[str] = Field(default_factory=list)
    threat_model: dict[str, Any] = Field(default_factory=dict)
    audit: dict[str, Any] | None = None
    leak_test: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None

    @field_validator("subject")
    @classmethod
    def _subject_shape(cls, subject: dict[str, Any]) -> dict[str, Any]:
        """The parts of ``subject`` that loading re-checks have the shapes it reads."""
        files = subject.get("files", {})
        if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(d, str) for k, d in files.items())):
            raise ValueError("subject.files must map file names to sha256 digests")
        for key in ("policy", "tables", "kernels"):
            if not isinstance(subject.get(key, {}), dict):
                raise ValueError(f"subject.{key} must be an object")
        return subject

    def add_claim(self, claim: Claim | dict) -> Claim:
        c = claim if isinstance(claim, Claim) else Claim.model_validate(claim)
        if any(old.id == c.id for old in self.claims):
            raise ValueError(f"duplicate claim id {c.id!r}")
        self.claims.append(c)
        self.verdict = overall(self.claims)
        return c

    def add_finding(self, code: str, severity: str, message: str, **details: Any) -> None:
        self.findings.append(Finding(code=code, severity=severity, message=message, details=details))

    def to_json(self, *, include_signature: bool = True) -> str:
        """Canonical JSON: sorted keys, fixed separators, so equal certificates hash equally."""
        data = self.model_dump(mode="json", exclude_none=True)
        if not include_signature:
            data.pop("signature", None)
        return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"

    def canonical_bytes(self) -> bytes:
        """The bytes a signature covers: the certificate without its signature."""
        return self.to_json(include_signature=False).encode()

    @classmethod
    def load(cls, path: str | Path) -> "Certificate":
        p = Path(path)
        if p.is_dir():
            p = p / "certificate.json"
        try:
            data = json.loads(p.read_bytes())
        except RecursionError:
            raise BundleError(f"{p}: not a readable certificate (nested too deeply)", code="DG402") from None
        except FileNotFoundError:
            raise BundleError(
                f"{p}: no certificate.json", code="DG401",
                hint="Give a directory written by `domainguard compile -o DIR`, a certified bundle, or a certificate.json.",
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{p}: not a readable certificate ({exc})", code="DG402") from None
        try:
            cert = cls.model_validate(data)
        except ValidationError as exc:  # one line: the first problem, and how many more there are
            errors = exc.errors(include_url=False)
            first = errors[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top level)"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise BundleError(f"{p}: malformed certificate: {where}: {first['msg']}{more}", code="DG402",
                              hint="Certificates are written by `domainguard compile -o` and `certify`; "
                                   "regenerate it rather than editing it.") from None
        return cert


def overall(claims: list[Claim]) -> StatusName:
    """REFUTED if any claim is refuted, else UNKNOWN if any is unknown, else PROVED (no claims: UNKNOWN)."""
    if not claims:
        return "UNKNOWN"
    statuses = {c.status for c in claims}
    if "REFUTED" in statuses:
        return "REFUTED"
    if "UNKNOWN" in statuses:
        return "UNKNOWN"
    return "PROVED"


# Digests of files hashed as they were written (``hashed_copies``): absolute path -> (identity, sha256).
_COPIED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("domainguard_copied_digests", default=None)


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What must not change for a recorded digest to stand: device, inode, size, modification and change
    times (ns; no caller can set the change time back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextlib.contextmanager
def hashed_copies(digests: dict):
    """Inside the block, ``sha256_file`` answers from ``digests`` (absolute path -> (``file_identity``,
    sha256)) for a file that still has the recorded identity, instead of reading it again: for the files
    of a private copy, hashed while they were written, which nothing may write to inside the block. Any
    other file is read and hashed as usual."""
    token = _COPIED.set(digests)
    try:
        yield
    finally:
        try:
            _COPIED.reset(token)
        except ValueError:  # left in another context (a generator closed elsewhere): forget the record
            _COPIED.set(None)


def sha256_file(path: str | Path) -> str:
    copied = _COPIED.get()
    if copied is not None:
        known = copied.get(os.path.abspath(path))
        if known is not None:
            with contextlib.suppress(OSError):
                if file_identity(os.stat(path, follow_symlinks=False)) == known[0]:
                    return known[1]
    return _hash_file(path)


def _hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    """Versions of everything that can change a result."""
    from . import __version__

    return {
        "domainguard": __version__,
        "python": platform.python_version(),
        "z3": _version("z3-solver"),
        "networkx": _version("networkx"),
        "pydantic": _version("pydantic"),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
    }


ASSUMPTIONS = [
    "Attention is the only operation that mixes information across sequence positions "
    "(checked by the graph audit for guarded models; assumed for a compiled policy alone).",
    "Each token carries exactly one domain id, assigned by the caller's layout; mislabelled input is out of scope.",
    "A path may use each layer once per forward pass; generated tokens re-enter at layer 0 in the generation domain.",
    "Domain-level verdicts hold for every sparsity pattern because patterns only remove token pairs "
    "(translation validation checks the compiled tables against this).",
]

THREAT_MODEL = {
    "adversary": "controls the contents (tokens, embeddings, even NaN/Inf activations) of domains a protected domain may not read",
    "protects": "outputs of protected tokens, and the gradients of their inputs (queries, keys, values, "
                "embeddings), are independent of forbidden domains' contents",
    "not_covered": [
        "side channels outside the model (timing, memory, batch composition)",
        "the length of forbidden segments when positions are global (reported as a finding)",
        "the length of forbidden segments at float-rounding level under any positions: how many keys a row "
        "reduces over sets the order of its float sums (logits move by about 1e-7); inputs of equal lengths "
        "are bitwise independent of forbidden contents",
        "KV caches changed by other code after the guard filled them (cropped, then refilled without the "
        "guard): the guard checks which guard filled a cache and under which domain ids, not its values",
        "information present in the weights themselves (training data memorisation)",
        "operations outside the guarded model (tokeniser, sampling code, retrieval)",
        "non-finite values (NaN, ±Inf) in tokens of domains a protected token may read, but that causality or a "
        "pattern excludes (later tokens, tokens outside a window): where they share a tile with allowed keys "
        "they can turn the row NaN, as in dense attention; only domains it may not read are excluded bitwise",
        "gradients of weights, which every token shares: a NaN or Inf activation anywhere makes them non-finite, "
        "guarded or not",
        "gradients of tokens that a forbidden domain itself reads: they depend on its queries by design, and a "
        "NaN or Inf there reaches them (as 0 × NaN) even when the loss ignores the forbidden domain's outputs",
    ],
}


def _random_links(value, path: str = "policy") -> list[dict]:
    """Every seeded random-link pattern in the policy, with where it is declared (the seed fixes the links)."""
    found = []
    if isinstance(value, dict):
        if isinstance(value.get("random"), dict):
            found.append({"at": path, **value["random"]})
        for k, v in value.items():
            found += _random_links(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _random_links(v, f"{path}[{i}]")
    return found


def from_verdict(compiled, verdict, *, files: dict[str, str] | None = None) -> Certificate:
    """A certificate for a compiled policy: subject digests, tool versions, one claim per result."""
    cert = Certificate(
        subject={
            "policy": {"name": compiled.policy.name, "sha256": compiled.policy_digest, "file": compiled.source},
            "tables": {"sha256": compiled.tables_digest, "domains": list(compiled.domains),
                       "layers": compiled.num_layers},
            "files": dict(sorted((files or {}).items())),
        },
        tools=tool_versions(),
        scope={
            "layers": compiled.num_layers if compiled.flow.depth_given else "any",
            "profile": compiled.profile,
            "generation": compiled.domains[compiled.generation_id] if compiled.generation_id is not None else None,
            "positions": compiled.positions,
            "random_links": _random_links(json.loads(compiled.canonical_policy)),
        },
        assumptions=list(ASSUMPTIONS),
        threat_model=dict(THREAT_MODEL),
    )
    for result in verdict.results:
        cert.add_claim(result.to_claim())
    for f in verdict.findings:
        cert.add_finding(f["code"], f["severity"], f["message"])
    cert.verdict = overall(cert.claims) if cert.claims else "PROVED"
    return cert
