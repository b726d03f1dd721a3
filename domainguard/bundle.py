"""Certified bundles: a guarded model, its policy, tables and certificate in one folder (DESIGN §7).

Layout (every path relative to the bundle; a superset of a compiled directory, so
``domainguard verify BUNDLE`` re-derives it too)::

    policy.yaml         the policy source the tables compile from (domain order = domain ids)
    policy.json         the canonical policy (its sha256 is the policy digest)
    domains.json        domain names in id order, pad id, layers, profile
    relations.npy       the relation tables, bool [L, D, D]
    model/              safetensors weights, config.json (+ tokenizer files when given)
    certificate.json    subject digests, tools, claims, findings, audit, leak test (canonical JSON)
    report/             the human-readable report, rendered from certificate.json
    manifest.json       sha256 of every file above, and of itself (canonical JSON)
    signature.json      optional, added by ``domainguard.signing``; not in the manifest

Writing is atomic: everything goes to a temporary folder beside the target, which is
renamed into place only when complete; on any failure nothing is left behind.
Loading re-checks every byte before anything is used: the manifest must be canonical,
match its own digest and list exactly the files present, each with its digest; a
signature.json, if present, must hold; the certificate must be
canonical and agree with the manifest; the policy must compile to the certified tables;
the loaded weights must hash to the certified tensor digest.

Error codes (BundleError): DG440 not a bundle / cannot write, DG441 manifest unreadable,
DG442 manifest not canonical, DG443 a file's digest changed, DG444 an extra file,
DG445 a missing file, DG446 a link or special file, DG447 certificate not canonical or
disagreeing with the manifest, DG448 policy/tables do not match the certificate,
DG449 weights do not match, DG450 certification refused (verdict not PROVED, audit
findings or a leak) or a certificate whose verdict does not follow from its claims, or that lacks
one a bundle must carry, DG451 refusing to replace a folder that is not a bundle, DG452 the
certified policy does not prove when re-verified, DG453 the installed kernels are not the
certified ones.

Without a signature (or without ``pubkey``) the checks show that the bundle is consistent,
not who made it: anyone can write a consistent unsigned bundle. What they cannot do is make
one load whose policy does not prove, whose tables are not that policy's, whose certificate
claims less than a certification checks, or whose kernels are not the ones installed here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from enum import Enum
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .artifact import replace_dir, temp_dir_beside, write_tables
from .errors import BundleError, DomainGuardError, Location, ModelError

__all__ = [
    "BUNDLE_FORMAT",
    "build_certificate",
    "save_certified",
    "load_certified",
    "check_bundle",
    "check_bundle_files",
    "certify_cli",
    "load_model_dir",
    "plain_model",
    "tensors_digest",
]

BUNDLE_FORMAT = "domainguard-bundle/1"
MANIFEST = "manifest.json"
CERTIFICATE = "certificate.json"
SIGNATURE = "signature.json"
MODEL_DIR = "model"
REPORT_DIR = "report"


# --- digests -----------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    from .certificate import sha256_file

    return sha256_file(path)


def tensors_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(data: dict) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def _files(root: Path) -> dict[str, Path]:
    """Every entry under ``root`` by relative POSIX path; links and special files are refused."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise _bad(p, "a link or special file has no place in a bundle", "DG446")
        if p.is_file():
            out[rel] = p
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _kernel_digest(state) -> dict:
    """The digest of the code that enforces the tables: the guard's own GuardedAttention (source and tables)."""
    from .kernels import source_manifest

    return {"sha256": state.attention.digest(), "method": "GuardedAttention.digest", "files": source_manifest()}


# --- the certificate ---------------------------------------------------------------------------
ASSUMPTIONS = [
    "The graph audit traces the model in evaluation mode without a KV cache; decoding with the cache runs the "
    "same per-token ops, and its attention goes through the same guarded interface (checked on every call).",
    "The guard runs the plain-PyTorch reference attention on CPU and the frozen kernels on a GPU; both are "
    "tested against the same dense mask.",
]


VALIDATION_BLOCKS = (128, 64)  # the tile sizes the kernels and FlexAttention export use
VALIDATION_MAX_LEN = 1 << 17
VALIDATION_MAX_SEGMENTS = 4


def build_certificate(model, *, inputs=None, trials: int | None = None, rounds: int = 2, generate_tokens: int = 2,
                      seed: int = 0, audit_report=None, verdict=None, validation: bool = True):
    """Verify the policy, validate the tile tables, audit the graph, leak-test and probe positions of a guarded ``model``.

    Returns a Certificate (subject files and weights are filled in by ``save_certified``).
    ``inputs`` = (input_ids, domain_ids) for the leak test; by default random tokens with a
    segment of every domain. ``audit_report`` and ``verdict`` reuse an audit of this same
    model and a ``verify`` of its compiled policy. Translation validation (Z3 over every
    layout up to the model's context length in at most 4 segments, at tile sizes 128 and 64,
    plus an exhaustive re-check of the leak-test layout's tables) takes tens of seconds for
    a deep model; ``validation=False`` keeps only its length-free part (under a second).
    """
    from .audit import audit
    from .certificate import Claim, from_verdict
    from .guard import guard_state
    from .layout import Layout
    from .leaktest import compare_dense, position_channel, synthetic_inputs
    from .verify import verify

    state = guard_state(model)
    compiled = state.compiled
    verdict = verdict if verdict is not None else verify(compiled)
    cert = from_verdict(compiled, verdict)
    config = model.config
    cert.subject["model"] = {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "architecture": state.architecture.name,
        "layers": compiled.num_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    cert.subject["kernels"] = _kernel_digest(state)
    cert.tools.update({"transformers": _version("transformers"), "safetensors": _version("safetensors")})
    causal = state.architecture.causal
    if inputs is None:
        vocab = int(model.get_input_embeddings().num_embeddings)
        # Segments of 1-16 tokens in a random order per row: a model that mixes positions a fixed distance apart,
        # or only once the sequence is long, is exercised where 4 tokens per domain would not.
        # (within the model's context, with room for the tokens the leak test generates)
        room = (int(getattr(config, "max_position_embeddings", None) or 1 << 20) - generate_tokens - 1) \
            // max(1, compiled.num_domains)
        inputs = synthetic_inputs(compiled, vocab, tokens_per_domain=(1, max(1, min(16, room))), seed=seed,
                                  causal=causal)
    input_ids, domain_ids = inputs
    max_len = min(int(getattr(config, "max_position_embeddings", None) or VALIDATION_MAX_LEN), VALIDATION_MAX_LEN)
    cert.scope.update({"max_seq_len": max_len, "block_size": list(VALIDATION_BLOCKS), "model": type(model).__name__})
    cert.assumptions.extend(ASSUMPTIONS)
    for claim in _validation(compiled, Layout.from_ids(compiled, domain_ids), max_len, full=validation):
        cert.add_claim(claim)

    report = audit_report if audit_report is not None else audit(model)
    cert.audit = report.to_dict()
    cert.add_claim(Claim(
        id="graph-audit",
        kind="graph-audit",
        statement=f"In {type(model).__name__}, guarded attention is the only operation that mixes sequence "
                  "positions (every other op on token data is position-wise)",
        scope={"model": type(model).__name__, "layers": compiled.num_layers, "sequence_length": "symbolic"},
        method={"name": "trace", "version": report.method["version"], "seconds": report.method["seconds"],
                "tool": "torch.export", "torch": torch.__version__},
        status="PROVED" if report.clean else "REFUTED",
        witness=[f.to_dict() for f in report.findings] or None,
        details={"ops_checked": report.ops_checked, "notes": list(report.notes)},
    ))

    guarded, dense = compare_dense(model, input_ids, domain_ids, trials=trials, rounds=rounds,
                                   generate_tokens=generate_tokens if causal else 0, seed=seed)
    channel = position_channel(model, compiled, seed=seed)
    cert.leak_test = {"guarded": guarded.to_dict(), "dense": dense.to_dict(), "position_channel": channel,
                      "leakage_rate": {"guarded": guarded.rate, "dense": dense.rate}}
    cert.add_claim(Claim(
        id="leak-test",
        kind="empirical-isolation",
        statement=f"In {guarded.trials} trials poisoning forbidden domains ({', '.join(guarded.by_poison)}), "
                  "no protected logit or hidden state changed by a single bit",
        scope={"trials": guarded.trials, "shape": list(input_ids.shape), "outputs": list(guarded.outputs)},
        method={"name": "empirical", "version": "1", "seconds": round(guarded.seconds, 3), "seed": seed},
        status="PROVED" if guarded.leaks == 0 else "REFUTED",
        witness=list(guarded.examples) or None,
        details={"leakage_rate": guarded.rate, "dense_leakage_rate": dense.rate},
    ))
    if channel["changed"]:
        cert.add_finding(
            "DGF51", "warning",
            f"measured: outputs of {channel['protected']!r} tokens change with the length of an earlier "
            f"{channel['source']!r} segment (positions: global); set `positions: reach` (or `per_domain`) to close this channel",
            **channel,
        )
    return cert


def _validation(compiled, layout, max_len: int, *, full: bool) -> list[dict]:
    """Translation-validation claims for the tables this model runs (validate.py)."""
    from .artifact import table_claims
    from .validate import validation_claims

    if not full:
        return table_claims(compiled)
    return validation_claims(compiled, block_sizes=VALIDATION_BLOCKS, max_len=max_len,
                             max_segments=VALIDATION_MAX_SEGMENTS, layouts=[layout])


def _refusal(cert) -> str | None:
    if cert.verdict != "PROVED":
        bad = [f"{c.id} {c.status}" for c in cert.claims if c.status != "PROVED"]
        return f"verdict {cert.verdict} ({', '.join(bad[:5])})"
    return None


# --- writing -----------------------------------------------------------------------------------
def _write_report(root: Path) -> list[str]:
    """Render the report into report/ when the report module is available."""
    try:
        from . import report
    except ImportError:
        return []
    (root / REPORT_DIR).mkdir()
    written = []
    for fmt, name in (("md", "report.md"), ("html", "report.html")):
        report.save(root / REPORT_DIR / name, report.render(str(root), fmt))
        written.append(f"{REPORT_DIR}/{name}")
    return written


def save_certified(model, path, *, certificate=None, tokenizer=None, key=None, **build) -> Path:
    """Write a certified bundle for a guarded ``model`` at ``path`` (atomically); return its path.

    Builds the certificate (``build_certificate(model, **build)``) unless one is given, and
    refuses (BundleError DG450, nothing written) unless its verdict is PROVED. With ``key``
    (an Ed25519 private key file) the bundle is also signed (``signing.sign_certificate``).
    """
    from .guard import guard_state

    state = guard_state(model)
    compiled = state.compiled
    cert = certificate if certificate is not None else build_certificate(model, **build)
    why = _refusal(cert)
    if why:
        raise BundleError(f"certification refused: {why}", code="DG450",
                          hint="See the certificate's claims; nothing was written.")
    target = Path(path).resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_bundle(target))):
        raise _bad(target, "exists and is not a bundle; refusing to replace it", "DG451",
                   hint="Choose a new or empty output folder.")
    added = _added_files(target) if target.is_dir() and is_bundle(target) else []
    if added:
        raise _bad(target / added[0], "is not part of the bundle being replaced; refusing to delete it", "DG451",
                   hint="Move it out of the bundle folder, or choose a new output folder.")
    try:
        tmp = temp_dir_beside(target)
    except OSError as exc:
        raise _bad(target, f"cannot write ({exc})", "DG440") from None
    try:
        write_tables(compiled, tmp)
        model.save_pretrained(tmp / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        files = {rel: _sha256_file(p) for rel, p in _files(tmp).items()}
        cert = cert.model_copy(deep=True)
        cert.subject["files"] = files
        weights = sorted(rel for rel in files if rel.startswith(f"{MODEL_DIR}/") and rel.endswith(".safetensors"))
        cert.subject["weights"] = {
            "format": "safetensors",
            "files": {rel: files[rel] for rel in weights},
            "tensors_sha256": tensors_digest(model),
            "dtype": cert.subject.get("model", {}).get("dtype"),
        }
        cert.subject["bundle"] = {"format": BUNDLE_FORMAT}
        (tmp / CERTIFICATE).write_bytes(cert.to_json().encode())
        _write_report(tmp)
        (tmp / MANIFEST).write_bytes(_manifest_bytes({rel: _sha256_file(p) for rel, p in _files(tmp).items()}))
        if key is not None:
            from .signing import sign_certificate

            sign_certificate(tmp, key)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- loading -----------------------------------------------------------------------------------
def _bad(path: Path, message: str, code: str, hint: str | None = None) -> BundleError:
    """A BundleError located at ``path`` (the CLI prints it as ``path: error CODE: message``)."""
    return BundleError(f"{path.name}: {message}", code=code, location=Location(str(path)), hint=hint)


def _manifest_body(files: dict[str, str]) -> dict:
    return {"format": BUNDLE_FORMAT, "files": dict(sorted(files.items()))}


def _manifest_bytes(files: dict[str, str]) -> bytes:
    body = _manifest_body(files)
    # The manifest's own digest makes any edit of it (a digest included) detectable as an edit of the manifest.
    return _canonical({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})


# Files every bundle holds (listed in its manifest); weights are safetensors only (nothing pickled is loaded).
REQUIRED = ("policy.yaml", "policy.json", "relations.npy", CERTIFICATE, f"{MODEL_DIR}/config.json")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
# Claims a bundle's certificate must carry besides its policy's own (``verify``), whatever else it holds.
REQUIRED_CLAIMS = ("graph-audit", "leak-test", "patterns-within-policy", "tile-rules-sound")


def load_json(raw: bytes | str):
    """``json.loads`` that reports input nested too deeply for the parser as a ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _inside(rel: str) -> bool:
    """``rel`` is a plain relative POSIX path that stays inside its folder."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(x not in ("", ".", "..") for x in parts)


def _read_manifest(root: Path) -> dict[str, str]:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise _bad(mpath, "missing; not a certified bundle", "DG445")
    raw = mpath.read_bytes()
    try:
        manifest = load_json(raw)
        listed = manifest["files"]
        if manifest.get("format") != BUNDLE_FORMAT or not isinstance(listed, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
            raise ValueError("files must map paths to sha256 digests")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _bad(mpath, f"unreadable manifest ({exc})", "DG441") from None
    outside = sorted(rel for rel in listed if not _inside(rel))
    if outside:
        raise _bad(mpath, f"names a path that is not inside the bundle: {outside[0]!r}", "DG441")
    if _manifest_bytes(listed) != raw:
        raise _bad(mpath, "changed since it was written (not canonical, or its own digest differs)", "DG442")
    return listed


def is_bundle(root: Path) -> bool:
    """``root`` holds a manifest in this module's format (what ``save_certified`` may replace)."""
    try:
        manifest = load_json((Path(root) / MANIFEST).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


def _added_files(root: Path) -> list[str]:
    """Entries of bundle ``root`` its manifest does not list (links and special files included)."""
    try:
        listed = set(load_json((root / MANIFEST).read_bytes()).get("files", {}))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        listed = set()
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_symlink() or not p.is_dir()) and rel not in listed | {MANIFEST, SIGNATURE}:
            out.append(rel)
    return out


def claims_bundle(root: Path, subject: dict) -> bool:
    """A directory that is (or says it is) a certified bundle: a manifest, or a certificate naming the format."""
    return (Path(root) / MANIFEST).exists() or "bundle" in (subject or {})


def check_bundle_files(path) -> dict[str, str]:
    """The byte-level checks of a bundle: the manifest is intact, lists exactly the files present
    (no links or special files, every required file) with their digests, and a signature that is
    there holds. Returns the manifest's files; BundleError names the first file that fails."""
    root = Path(path)
    if not root.is_dir():
        raise _bad(root, "no such bundle folder", "DG440")
    listed = _read_manifest(root)
    present = _files(root)
    for rel in present:
        if rel not in listed and rel not in (MANIFEST, SIGNATURE):
            raise _bad(root / rel, "not part of the certified bundle (added after certification)", "DG444")
    for rel in REQUIRED:
        if rel not in listed:
            raise _bad(root / rel, "not in the manifest; every bundle holds it", "DG445")
    for rel, digest in sorted(listed.items()):
        if rel not in present:
            raise _bad(root / rel, "listed in the manifest but missing", "DG445")
        if _sha256_file(present[rel]) != digest:
            raise _bad(root / rel, "contents changed since certification (sha256 mismatch)", "DG443")
    if SIGNATURE in present:
        from .signing import check_signature_integrity

        check_signature_integrity(root)  # a signature that is there must hold (BundleError names the file)
    return listed


def claim_problems(cert, verdict) -> list[str]:
    """How a bundle's certificate falls short of a certification of its policy: a claim of the
    re-run ``verdict`` (``verify`` of the bundle's policy) or of ``REQUIRED_CLAIMS`` missing or not
    PROVED, or the certificate's verdict not what its claims give."""
    from .certificate import overall

    have = {c.id: c.status for c in cert.claims}
    problems = []
    if cert.claims and cert.verdict != overall(cert.claims):
        problems.append(f"its verdict {cert.verdict} does not follow from its claims ({overall(cert.claims)})")
    for cid in [r.id for r in verdict.results] + list(REQUIRED_CLAIMS):
        if cid not in have:
            problems.append(f"claim {cid!r} is missing")
        elif have[cid] != "PROVED":
            problems.append(f"claim {cid!r} is {have[cid]}")
    return problems


_MAX_DEPTH = 8  # folders below a bundle's top (it writes model/ and report/, one level down)


@contextlib.contextmanager
def private_copy(path):
    """A private copy of bundle ``path`` (a 0700 folder under the system's temporary directory), for checks
    and loading to read the same bytes: between a check of the bundle and a load from it, whoever may write
    there could change or swap a file, or the whole folder. Only what the manifest lists is copied, without
    following links, and errors raised inside name the bundle's own paths."""
    src = Path(path)
    if not src.is_dir():
        raise _bad(src, "no such bundle folder", "DG440")
    listed = set(_read_manifest(src)) | {MANIFEST, SIGNATURE}  # the file set, before anything is read in full
    with _copied(src, listed, None) as copy:
        yield copy


@contextlib.contextmanager
def snapshot(path):
    """A private copy of every regular file of folder ``path`` (a compiled directory or a bundle), for a
    verification to read one state of it: read in place, a signature could be checked on other bytes than
    the files and proofs checked before it, if the folder changed in between. Yields (copy, odd): odd lists
    the links and special files found (relative paths, not copied) for the caller to report; an added
    regular file is copied, so the checks still see it. Errors raised inside name the folder's own paths."""
    src = Path(path)
    if not src.is_dir():
        raise _bad(src, "no such folder", "DG440")
    odd: list[str] = []
    with _copied(src, None, odd) as copy:
        yield copy, odd


@contextlib.contextmanager
def _copied(src: Path, listed: set[str] | None, odd: list[str] | None):
    """``_copy_listed`` into a fresh 0700 folder under the temporary directory, removed afterwards."""
    from .certificate import hashed_copies

    base = Path(tempfile.mkdtemp(prefix="domainguard-load-"))
    copy = base / "bundle"
    try:
        try:
            digests = _copy_listed(src, copy, listed, shutil.disk_usage(base).free, odd)
        except OSError as exc:
            raise _bad(src, f"cannot copy it to check it ({exc.strerror or exc})", "DG440",
                       hint="Check the free space of the temporary directory (TMPDIR).") from None
        try:
            # Each file was hashed as it was copied: the checks inside do not read the weights again.
            with hashed_copies(digests):
                yield copy
        except DomainGuardError as exc:
            raise _relocated(exc, copy, src)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _relocated(exc: DomainGuardError, copy: Path, src: Path) -> DomainGuardError:
    """``exc`` with the private copy's paths written as the bundle's."""
    exc.message = relocate_paths(exc.message, copy, src)
    exc.args = (exc.message,)
    exc.hint = relocate_paths(exc.hint, copy, src)
    if exc.location is not None:
        exc.location = dataclasses.replace(exc.location, file=relocate_paths(exc.location.file, copy, src))
    return exc


def relocate_paths(value, copy: Path, src: Path):
    """``value`` (a string, or a dict, list, tuple or dataclass holding strings: a verdict, say) with the paths of
    private copy ``copy`` written as those of the folder ``src`` it was copied from. Nothing else lives in the
    copy's temporary parent, so its path occurs in no other path."""
    if isinstance(value, Enum):
        return value
    if isinstance(value, str):
        return value.replace(str(copy), str(src))
    if isinstance(value, dict):
        return {k: relocate_paths(v, copy, src) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocate_paths(v, copy, src) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: relocate_paths(getattr(value, f.name), copy, src)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _copy_listed(src: Path, dst: Path, listed: set[str] | None, room: int, odd: list[str] | None = None) -> dict:
    """Copy the regular files of ``src`` into a new folder ``dst``, walking by file descriptors (no path is
    looked up twice, no link is followed); a file not in ``listed`` (None: every file is), a link, a special
    file or a tree deeper than ``_MAX_DEPTH`` is refused before anything large is read, and so is more data
    than ``room`` bytes. With an ``odd`` list, links and special files are left out and their relative paths
    appended to it instead of refused. Returns each copy's sha256 of the bytes written, with its
    identity (``certificate.hashed_copies``)."""
    from .certificate import file_identity

    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    todo = [(os.open(src, dir_flags), "", dst)]
    os.mkdir(dst, 0o700)
    found: list[tuple[int, str, str, Path, int]] = []  # (folder fd, name, relative path, copy, size)
    opened = [todo[0][0]]
    try:
        while todo:
            fd, prefix, out = todo.pop()
            for name in sorted(os.listdir(fd)):
                rel = prefix + name
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if rel.count("/") + 1 >= _MAX_DEPTH:
                        raise _bad(src / rel, f"folders nested more than {_MAX_DEPTH} deep have no place in a bundle",
                                   "DG446")
                    child = os.open(name, dir_flags, dir_fd=fd)
                    opened.append(child)
                    os.mkdir(out / name, 0o700)
                    todo.append((child, rel + "/", out / name))
                elif not stat.S_ISREG(st.st_mode):
                    if odd is None:
                        raise _bad(src / rel, "a link or special file has no place in a bundle", "DG446")
                    odd.append(rel)
                elif listed is not None and rel not in listed:
                    raise _bad(src / rel, "not part of the certified bundle (added after certification)", "DG444")
                else:
                    found.append((fd, name, rel, out / name, st.st_size))
        need = sum(size for *_, size in found)
        if need > room:
            raise _bad(src, f"holds {need / 2**30:.1f} GiB, more than the {room / 2**30:.1f} GiB free where it "
                       "would be copied to be checked", "DG440", hint="Free space in the temporary directory, or "
                       "point TMPDIR at a larger one.")
        digests = {}
        for fd, name, rel, target, _ in found:
            with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as fin, open(target, "xb") as fout:
                if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                    raise _bad(src / rel, "a link or special file has no place in a bundle", "DG446")
                digest = _copy_file(fin, fout)
                fout.flush()
                os.fchmod(fout.fileno(), 0o400)  # read-only: a write into the copy fails instead of going unseen
                digests[os.path.abspath(target)] = (file_identity(os.fstat(fout.fileno())), digest)
        return digests
    finally:
        for fd in opened:
            os.close(fd)


def _copy_file(fin, fout) -> str:
    """Copy one open file to another; return the sha256 of the bytes written."""
    h = hashlib.sha256()
    while chunk := fin.read(1 << 22):
        h.update(chunk)
        fout.write(chunk)
    return h.hexdigest()


def stated_problems(cert, verdict) -> list[str]:
    """Where a certificate's words are not this domainguard's: its assumptions, its threat model, and the
    statement and kind of each claim that ``verdict`` re-derived. Unsigned, nothing else
    covers them, and a report prints them to its reader."""
    from .certificate import ASSUMPTIONS as POLICY_ASSUMPTIONS
    from .certificate import THREAT_MODEL

    problems = []
    base = list(POLICY_ASSUMPTIONS)
    if cert.assumptions[:len(base)] != base or any(a not in base + ASSUMPTIONS for a in cert.assumptions):
        problems.append("its assumptions are not the ones domainguard states")
    if cert.threat_model != THREAT_MODEL:
        problems.append("its threat model is not the one domainguard states")
    claims = {c.id: c for c in cert.claims}
    for r in verdict.results:
        c = claims.get(r.id)
        if c is not None and (c.statement != r.statement or c.kind != r.kind):
            problems.append(f"claim {r.id!r} says other words than its re-derivation")
    return problems


def check_bundle(path, *, shown=None) -> tuple[object, object]:
    """Re-check every byte of a bundle and re-prove its policy; return (certificate, compiled policy).

    BundleError names the file: the files (``check_bundle_files``), the certificate (canonical, in
    agreement with the manifest, verdict PROVED and following from claims that include every one a
    certification makes), the policy (compiles to the certified digest and tables, and proves again
    here: ``verify``). ``shown``: the folder the policy's locations name, where ``path`` is a copy of it."""
    from .certificate import Certificate
    from .compiled import compile as compile_policy
    from .parse import loads_policy
    from .verify import verify

    root = Path(path)
    listed = check_bundle_files(root)
    cpath = root / CERTIFICATE
    cert = Certificate.load(cpath)
    if cert.to_json().encode() != cpath.read_bytes():
        raise _bad(cpath, "not in canonical form", "DG447")
    for rel, digest in cert.subject.get("files", {}).items():
        if listed.get(rel) != digest:
            raise _bad(root / rel, "the certificate and the manifest disagree about it", "DG447")
    if cert.verdict != "PROVED":
        raise _bad(cpath, f"verdict {cert.verdict}; only PROVED bundles load", "DG450")

    ppath = root / "policy.yaml"
    try:
        text = ppath.read_text(encoding="utf-8")
        canonical = (root / "policy.json").read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(ppath, f"not UTF-8 text ({exc})", "DG448") from None
    source = str(Path(shown or root) / "policy.yaml")
    policy = loads_policy(text, source)
    layers = cert.scope.get("layers")
    compiled = compile_policy(policy, layers=layers if isinstance(layers, int) else None,
                              profile=cert.scope.get("profile"), source=source)
    if compiled.policy_digest != cert.subject.get("policy", {}).get("sha256"):
        raise _bad(ppath, "policy digest differs from the certificate's", "DG448")
    if canonical != compiled.canonical_policy + "\n":
        raise _bad(root / "policy.json", "not the canonical form of policy.yaml", "DG448")
    if compiled.tables_digest != cert.subject.get("tables", {}).get("sha256"):
        raise _bad(ppath, "compiles to tables other than the certified ones", "DG448")
    rpath = root / "relations.npy"
    try:
        stored = np.load(rpath, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(rpath, f"unreadable ({exc})", "DG448") from None
    if stored.shape != compiled.relations.shape or not np.array_equal(stored, compiled.relations):
        raise _bad(rpath, "tables differ from what the policy compiles to", "DG448")
    verdict = verify(compiled)
    if verdict.status.value != "PROVED":
        bad = [f"{r.id} {r.status.value}" for r in verdict.results if r.status.value != "PROVED"]
        raise _bad(ppath, f"re-verified here, the policy is {verdict.status.value} ({', '.join(bad[:5])})", "DG452")
    problems = claim_problems(cert, verdict) + stated_problems(cert, verdict)
    if problems:
        raise _bad(cpath, "falls short of a certification: " + "; ".join(problems[:5]), "DG450")
    return cert, compiled


def _model_class(config_path: Path):
    import transformers

    try:
        config = load_json(config_path.read_bytes())
        name = config["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise _bad(config_path, f"no model architecture ({exc})", "DG448") from None
    cls = getattr(transformers, str(name), None)
    if cls is None or not isinstance(cls, type):
        raise ModelError(f"{config_path}: unknown architecture {name!r}", code="DG501")
    return cls


def load_certified(path, *, pubkey: str | None = None, return_tokenizer: bool = False):
    """Check a bundle byte for byte, load its model and guard it under the certified policy.

    With ``pubkey`` the bundle's signature is checked too. Everything is read from one private copy
    (``private_copy``), so what was checked is what loads. The certificate is available as
    ``domainguard.guard.guard_state(model).certificate``.
    """
    root = Path(path)
    with private_copy(root) as copy:  # every check and the load read one copy: nothing changes in between
        return _load_checked(copy, root, pubkey, return_tokenizer)


def _load_checked(root: Path, shown: Path, pubkey, return_tokenizer: bool):
    from .artifact import kernel_subject
    from .guard import guard, guard_state

    signature = None
    if pubkey is not None:
        from .signing import verify_bundle_signature

        signature = verify_bundle_signature(str(root), pubkey)
    cert, compiled = check_bundle(root, shown=shown)

    certified = cert.subject.get("kernels", {}).get("sha256")
    installed = kernel_subject(compiled)["sha256"]
    if certified != installed:
        raise _bad(root / CERTIFICATE, f"certifies kernels {str(certified)[:12]}…, but the installed ones are "
                   f"{installed[:12]}…: the code that would enforce the tables is not the certified code", "DG453",
                   hint=f"Load it with the domainguard the certificate names ({cert.tools.get('domainguard')}), "
                        "or certify the model again with this one.")
    model_dir = root / MODEL_DIR
    weights = cert.subject.get("weights")
    dtype = weights.get("dtype") if isinstance(weights, dict) else None
    listed = sorted(rel for rel in cert.subject.get("files", {}) if rel.startswith(f"{MODEL_DIR}/"))
    other = [rel for rel in listed if rel.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    if not isinstance(weights, dict) or weights.get("format") != "safetensors" or dtype not in WEIGHT_DTYPES or other:
        raise _bad(model_dir, "weights must be safetensors of " + "/".join(WEIGHT_DTYPES)
                   + (f" (holds {other[0]})" if other else f" (certificate: {weights!r:.80})"), "DG449")
    cls = _model_class(model_dir / "config.json")
    model = cls.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), use_safetensors=True)
    model.eval()
    # The files were checked above; this checks what was actually loaded (and closes the gap between the two).
    if tensors_digest(model) != weights.get("tensors_sha256"):
        raise _bad(model_dir, "loaded weights differ from the certified tensors", "DG449")
    guard(model, compiled)
    state = guard_state(model)
    state.certificate = cert
    # Who made it: a signature checked against ``pubkey`` names the signer; otherwise nothing does.
    state.authenticated = signature is not None and signature.authenticated
    if not return_tokenizer:
        return model
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(str(model_dir))


# --- the certify command ------------------------------------------------------------------------
def plain_model(model):
    """A plain floating-point copy of a model transformers loaded from GGUF, or ``model`` itself.

    transformers' legacy GGUF loader dequantizes the weights into ordinary float tensors but
    keeps a quantizer attached that refuses ``save_pretrained``; a bundle needs the weights
    as the safetensors they are.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ModelError(f"{type(model).__name__} holds quantized weights; a bundle stores float weights",
                         code="DG503")
    import copy

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_model_dir(model_dir) -> tuple[object, object | None]:
    """A transformers model (and tokenizer, if any) from a folder: Hugging Face files or one GGUF file."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    root = Path(model_dir)
    if not root.is_dir():
        raise ModelError(f"{root}: no such model folder", code="DG503")
    kwargs = {}
    if not (root / "config.json").is_file():
        ggufs = sorted(root.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"{root}: expected config.json or exactly one .gguf file, found {len(ggufs)} GGUF files",
                             code="DG503")
        kwargs["gguf_file"] = ggufs[0].name
    loader = AutoModelForCausalLM
    if (root / "config.json").is_file():
        arch = (json.loads((root / "config.json").read_text()).get("architectures") or [""])[0]
        if "MaskedLM" in arch or arch.endswith("Model") and "Bert" in arch:
            loader = AutoModelForMaskedLM
    try:
        model = plain_model(loader.from_pretrained(str(root), **kwargs).eval())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{root}: cannot load the model ({exc})", code="DG503") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


_EXIT = {"PROVED": 0, "REFUTED": 1, "UNKNOWN": 3}


def certify_cli(model_dir: str, policy_path: str, profile: str | None, out_dir: str, *, key: str | None = None) -> int:
    """``domainguard certify``: guard, verify, audit, leak-test and write a bundle; return the exit code.

    0 certified, 1 refuted (a forbidden flow, an audit finding or a measured leak),
    3 inconclusive; bad input raises a DomainGuardError (the CLI maps it to 2).
    """
    from .compiled import compile as compile_policy
    from .guard import guard
    from .parse import load_policy
    from .verify import verify

    start = time.perf_counter()
    say = lambda s: print(s, file=sys.stderr)  # noqa: E731
    policy = load_policy(policy_path)
    if key is not None:
        from .signing import load_private_key

        load_private_key(key)  # a bad key fails before minutes of certification, not after
    model, tokenizer = load_model_dir(model_dir)
    layers = int(model.config.num_hidden_layers)
    compiled = compile_policy(policy, layers=layers, profile=profile, source=str(policy_path))
    verdict = verify(compiled)
    if verdict.status.value != "PROVED":
        # The policy alone decides this; no need to guard, audit or leak-test the model.
        for r in verdict.results:
            say(f"  {r.status.value:<8} {r.id}: {r.statement}")
            for w in r.witness:
                say(f"           witness: {w}")
        say(f"verdict: {verdict.status.value}; no bundle written")
        return _EXIT[verdict.status.value]
    guard(model, compiled)
    cert = build_certificate(model, verdict=verdict)
    for c in cert.claims:
        say(f"  {c.status:<8} {c.id}: {c.statement}")
    for f in cert.findings:
        say(f"  {f.severity:<8} {f.code}: {f.message}")
    rate = (cert.leak_test or {}).get("leakage_rate", {})
    say(f"  leakage rate: guarded {rate.get('guarded', 0):.3f}, dense {rate.get('dense', 0):.3f}")
    if cert.verdict != "PROVED":
        say(f"verdict: {cert.verdict}; no bundle written")
        return _EXIT[cert.verdict]
    target = save_certified(model, out_dir, certificate=cert, tokenizer=tokenizer, key=key)
    say(f"verdict: PROVED; wrote {target} in {time.perf_counter() - start:.1f} s")
    return 0
