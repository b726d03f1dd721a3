"""Compiled directories on disk: written atomically, re-derived from their policy when read.

A compiled directory (``domainguard compile -o DIR``) holds::

    policy.yaml        the policy source the tables compile from (domain order = domain ids)
    policy.json        the canonical policy (its sha256 is the policy digest)
    domains.json       domain names in id order, pad id, layers, profile
    relations.npy      the relation tables, bool [L, D, D]
    certificate.json   subject digests (policy, tables, kernels, files), claims, findings
    signature.json     optional (``--key``): Ed25519 over the certificate and every file

A certified bundle (bundle.py) is a superset, so everything here reads bundles too.
Nothing is written in place: files go to a temporary folder beside the target that is
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import BundleError

POLICY_FILES = ("policy.yaml", "policy.json")


def policy_text(compiled) -> str:
    """The text the tables compile from: the source file when known, else the canonical policy."""
    if compiled.source and Path(compiled.source).is_file():
        return Path(compiled.source).read_text(encoding="utf-8")
    return compiled.canonical_policy + "\n"


def write_tables(compiled, root: Path) -> None:
    """policy.yaml, policy.json, domains.json and relations.npy into ``root``."""
    (root / "policy.yaml").write_text(policy_text(compiled), encoding="utf-8")
    (root / "policy.json").write_text(compiled.canonical_policy + "\n", encoding="utf-8")
    (root / "domains.json").write_text(json.dumps({
        "domains": list(compiled.domains), "pad_id": compiled.pad_id, "layers": compiled.num_layers,
        "profile": compiled.profile, "depth_given": compiled.flow.depth_given}, indent=1) + "\n")
    with open(root / "relations.npy", "wb") as f:
        np.save(f, np.ascontiguousarray(compiled.relations), allow_pickle=False)


def temp_dir_beside(target: Path) -> Path:
    """An empty private (0700) folder next to ``target`` (same file system, so the final rename is atomic).
    It stays private while it is written and signed: nobody else can change a file between its writing and
    its hashing. ``replace_dir`` gives it the umask's mode as it moves it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux): setting it to read
    it would, for a moment, apply to files other threads create."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``target`` atomically: into a new file of an unpredictable name (O_EXCL, so a link
    planted at a guessable name is never followed) in ``tmp_dir`` (default: beside ``target``; the same file
    system), then renamed over ``target``. The file is private while written and gets the mode a new file
    gets under the umask (mkstemp's 0600 would make a report or signature private by accident). OSError on
    failure, with nothing left behind."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=tmp_dir or target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``; an old ``target`` is restored if the move fails."""
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the result private by accident
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
    try:
        tmp.rename(target)
    except OSError:
        if backup is not None:
            backup.rename(target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def kernel_subject(compiled) -> dict:
    """What enforces the tables: the digest of the frozen kernels (source and tables) and each source file."""
    from .attention import GuardedAttention
    from .kernels import source_manifest

    return {"sha256": GuardedAttention(compiled).digest(), "method": "GuardedAttention.digest",
            "files": source_manifest()}


def table_claims(compiled) -> list[dict]:
    """Translation-validation claims that hold for every layout of any length (Z3, well under a second):
    the tile rules are sound, and no pattern adds a pair the policy forbids."""
    from .validate import prove_patterns_within_policy, prove_tile_rules_sound

    return [prove_patterns_within_policy(compiled), prove_tile_rules_sound(compiled)]


def _not_compiled_output(target: Path) -> str | None:
    """Why ``target`` may not be replaced by a compiled directory (None: absent, empty, or one written by
    ``write_compiled`` holding nothing else). A certified bundle, or any folder with files of its own, is kept."""
    if not target.exists():
        return None
    if not target.is_dir():
        return "exists and is not a folder"
    if not any(target.iterdir()):
        return None
    try:
        cert = json.loads((target / "certificate.json").read_bytes())
        ours = isinstance(cert, dict) and cert.get("format") == "domainguard-certificate/1"
    except (OSError, ValueError, RecursionError):
        ours = False
    if not ours:
        return "exists and is not a compiled directory"
    from .bundle import claims_bundle

    if claims_bundle(target, cert.get("subject")):
        return "is a certified bundle"
    files = cert.get("subject", {}).get("files")
    known = set(files) if isinstance(files, dict) else set()
    for p in sorted(target.rglob("*")):
        rel = p.relative_to(target).as_posix()
        if p.is_symlink() or (p.is_file() and rel not in known | {"certificate.json", "signature.json"}):
            return f"holds {rel}, which is not part of a compiled directory"
    return None


def write_compiled(compiled, verdict, target: str | Path, *, key: str | None = None):
    """Write the compiled directory ``target`` (everything lands, or nothing changes); returns (file digests,
    certificate). The certificate adds the kernel digest and translation-validation claims to ``verdict``.

    With ``key`` (an Ed25519 private key file) the directory is signed last.
    """
    from .certificate import from_verdict, sha256_file

    target = Path(target).resolve()
    foreign = _not_compiled_output(target)
    if foreign:
        raise BundleError(f"{target}: {foreign}; refusing to replace it", code="DG451",
                          hint="Choose a new or empty output folder.")
    if key is not None:
        from .signing import load_private_key

        load_private_key(key)  # a bad key fails before anything is written
    try:
        tmp = temp_dir_beside(target)
    except OSError as exc:
        raise BundleError(f"{target}: cannot write ({exc.strerror or exc})", code="DG440",
                          hint="Choose an output folder in a writable place.") from None
    try:
        write_tables(compiled, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        cert = from_verdict(compiled, verdict, files=files)
        cert.subject["kernels"] = kernel_subject(compiled)
        for claim in table_claims(compiled):
            cert.add_claim(claim)
        (tmp / "certificate.json").write_text(cert.to_json())
        if key is not None:
            from .signing import sign_certificate

            sign_certificate(tmp, key)
        replace_dir(tmp, target)
        return files, cert
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(f"{target}: cannot write ({exc.strerror or exc}); nothing was changed", code="DG440",
                              hint="Check the free space and permissions of the output folder.") from None
        raise


def load_dir(path: Path):
    """Re-derive a compiled directory or bundle from its policy; returns (compiled, certificate, problems).

    ``problems`` lists every file that differs from what the certificate names or the policy compiles to.
    """
    from .certificate import Certificate, sha256_file
    from .compiled import compile
    from .parse import load_policy, loads_policy

    from .bundle import _inside, check_bundle_files, claims_bundle

    path = Path(path)
    cert = Certificate.load(path)
    problems: list[str] = []
    named = cert.subject.get("files", {})
    if claims_bundle(path, cert.subject):
        # A bundle: its manifest covers every file (model, report, ...), not only those the certificate names.
        try:
            check_bundle_files(path)
        except BundleError as exc:
            problems.append(f"{exc.location or path}: {exc.message.split(': ', 1)[-1]}")
    elif not ((path / "signature.json").is_file() and not (path / "signature.json").is_symlink()):
        # (A signed directory's signature lists every file it covers, added ones too: signing checks those.)
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                problems.append(f"{p}: a link or special file has no place in a compiled directory")
            elif p.is_file() and rel not in named and rel not in ("certificate.json", "signature.json"):
                problems.append(f"{p}: not part of the certified directory (added after certification)")
    for name, digest in named.items():
        p = path / name
        if not _inside(name):
            problems.append(f"{path / 'certificate.json'}: names {name!r}, which is not a path inside the directory")
        elif not p.is_file() or p.is_symlink():
            problems.append(f"{p}: listed in the certificate but missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: contents changed since certification (sha256 mismatch)")
    if (path / "policy.yaml").is_file():
        src = path / "policy.yaml"
        policy = load_policy(src)
    elif (path / "policy.json").is_file():
        src = path / "policy.json"
        policy = loads_policy(src.read_text(encoding="utf-8"), str(src))
    else:
        raise BundleError(f"{path}: no policy.yaml or policy.json", code="DG403")
    layers = cert.scope.get("layers")
    compiled = compile(policy, layers=layers if isinstance(layers, int) else None, profile=cert.scope.get("profile"),
                       source=str(src))
    canonical = path / "policy.json"
    if canonical.is_file() and canonical.read_bytes() != (compiled.canonical_policy + "\n").encode():
        problems.append(f"{canonical}: not the canonical form of {src.name}")
    if cert.subject.get("policy", {}).get("sha256") not in (None, compiled.policy_digest):
        problems.append(f"{src}: policy digest differs from the certificate's")
    rel_file = path / "relations.npy"
    if rel_file.is_file():
        try:
            stored = np.load(rel_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            stored = None
            problems.append(f"{rel_file}: unreadable ({exc})")
        if stored is not None and (stored.shape != compiled.relations.shape or not (stored == compiled.relations).all()):
            problems.append(f"{rel_file}: tables do not match the policy")
    if cert.subject.get("tables", {}).get("sha256") not in (None, compiled.tables_digest):
        problems.append(f"{path / 'certificate.json'}: tables digest does not match the policy")
    return compiled, cert, problems
