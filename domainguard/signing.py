"""Ed25519 detached signatures over a certificate and every file of its bundle.

``signature.json`` (beside ``certificate.json``) holds a signed *payload*::

    {"format": "domainguard-signed-bundle/1",
     "certificate": {"path": "certificate.json", "canonical_sha256": <hex>, "excluded_fields": ["signature"]},
     "files": {<relative posix path>: <sha256 hex>, ...}}     # every file but signature.json itself

and the Ed25519 signature over the payload's canonical JSON (RFC 8785, JCS). The
canonical certificate is the JCS form of certificate.json without its ``signature``
field, so the signature names the certificate's *content*; the file list names its
exact bytes and those of every other file, so a one-byte change anywhere in the
bundle, an added file or a removed one fails verification naming the file.

A third party can re-check a bundle without domainguard: recompute the sha256 of
each file, serialise the payload with any JCS implementation and check the
signature with any Ed25519 verifier against the signer's published key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .artifact import replace_file
from .certificate import sha256_file
from .errors import BundleError, Location

SIGNATURE_FILE = "signature.json"
CERTIFICATE_FILE = "certificate.json"
SIGNATURE_FORMAT = "domainguard-signature/1"
PAYLOAD_FORMAT = "domainguard-signed-bundle/1"
KEY_PASSWORD_ENV = "DOMAINGUARD_KEY_PASSWORD"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


# --- canonical JSON (RFC 8785) ---------------------------------------------------------------
def _jcs_number(x: float) -> str:
    """ECMAScript Number.prototype.toString for a finite double, as RFC 8785 §3.2.2.3 requires."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError("NaN and Infinity have no JSON form")
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")  # repr is the shortest round-trip form
    whole, _, frac = mantissa.partition(".")
    raw = whole + frac
    lead = len(raw) - len(raw.lstrip("0"))
    digits = raw[lead:].rstrip("0")
    k, n = len(digits), len(whole) + int(exp or 0) - lead  # value = 0.digits × 10**n
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        e = n - 1
        body = (digits[0] + ("." + digits[1:] if k > 1 else "")) + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + body


def _jcs(obj, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(_jcs_number(obj))
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _jcs(item, out)
        out.append("]")
    elif isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("JSON object keys must be strings")
        out.append("{")
        # RFC 8785 §3.2.3: keys sorted by their UTF-16 code units.
        for i, key in enumerate(sorted(obj, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _jcs(obj[key], out)
        out.append("}")
    else:
        raise TypeError(f"{type(obj).__name__} has no JSON form")


def canonical_json(obj) -> bytes:
    """RFC 8785 (JCS) canonical UTF-8 bytes of a JSON value."""
    out: list[str] = []
    _jcs(obj, out)
    return "".join(out).encode("utf-8")


def canonical_certificate(cert: dict) -> bytes:
    """The bytes a signature speaks for: the certificate without its ``signature`` field, in JCS form."""
    return canonical_json({k: v for k, v in cert.items() if k != "signature"})


# --- strict reading --------------------------------------------------------------------------
def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def read_json_strict(path: Path, *, code: str = "DG411") -> dict:
    """Parse a JSON object, refusing duplicate keys, NaN/Infinity and invalid UTF-8; errors name the file."""
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FileNotFoundError:
        raise
    except RecursionError:
        raise BundleError("not valid JSON: nested too deeply", code=code, location=Location(str(path))) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"not valid JSON: {exc}", code=code, location=Location(str(path))) from None
    if not isinstance(data, dict):
        raise BundleError("expected a JSON object", code=code, location=Location(str(path)))
    return data


# --- keys ------------------------------------------------------------------------------------
def _key_error(path: Path, message: str) -> BundleError:
    return BundleError(message, code="DG412", location=Location(str(path)),
                       hint="Pass an Ed25519 key: PEM (PKCS#8 private / SubjectPublicKeyInfo public), "
                            "OpenSSH public, or 32 raw bytes (binary or 64 hex digits).")


def _raw32(data: bytes) -> bytes | None:
    if len(data) == 32:
        return data
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode())
    return None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (password from $DOMAINGUARD_KEY_PASSWORD if encrypted) or 32 raw bytes."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise _key_error(p, f"cannot read private key: {exc.strerror or exc}") from None
    raw = _raw32(data)
    if raw is not None:
        return Ed25519PrivateKey.from_private_bytes(raw)
    password = os.environ.get(KEY_PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except UnsupportedAlgorithm as exc:
        raise _key_error(p, f"unsupported key ({exc})") from None
    except TypeError:
        raise _key_error(p, f"the private key is encrypted; set {KEY_PASSWORD_ENV}") from None
    except ValueError as exc:
        raise _key_error(p, f"not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _key_error(p, f"a {type(key).__name__} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, OpenSSH or 32 raw bytes; a private key file yields its public half."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise _key_error(p, f"cannot read public key: {exc.strerror or exc}") from None
    raw = _raw32(data)
    if raw is not None:
        return Ed25519PublicKey.from_public_bytes(raw)
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        elif b"PRIVATE KEY" in data:
            return load_private_key(p).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _key_error(p, f"not a readable public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise _key_error(p, f"a {type(key).__name__} is not an Ed25519 public key")
    return key


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key: what a signer publishes and a verifier compares."""
    return "sha256:" + hashlib.sha256(raw_public_key(key)).hexdigest()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise BundleError("refusing to overwrite an existing key file", code="DG419",
                          location=Location(str(path)), hint="Remove it first or choose another path.") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_keypair(private_key_path: str | Path, public_key_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM (private key mode 0600); returns (private path, public path).

    ``public_key_path`` defaults to the private key path with ``.pub`` appended. Existing files are never overwritten.
    """
    priv_path = Path(private_key_path)
    pub_path = Path(public_key_path) if public_key_path is not None else priv_path.with_name(priv_path.name + ".pub")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if os.path.abspath(priv_path) == os.path.abspath(pub_path):
        raise BundleError("the private and public key paths are the same file", code="DG419",
                          location=Location(str(priv_path)), hint="Give the public key another name (default: PRIVATE.pub).")
    for p in (priv_path, pub_path):
        if p.exists():
            raise BundleError("refusing to overwrite an existing key file", code="DG419", location=Location(str(p)))
    written = []
    try:
        for p, data, mode in ((priv_path, pem, 0o600), (pub_path, pub, 0o644)):
            _write_new(p, data, mode)
            written.append(p)
    except BaseException as exc:
        for done in written:  # no half of a key pair is left behind
            done.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BundleError(f"cannot write the key file ({exc.strerror or exc}); nothing was written", code="DG419",
                              location=Location(str(exc.filename or p)), hint="Choose paths in a writable folder.") from None
        raise
    return priv_path, pub_path


# --- the manifest ----------------------------------------------------------------------------
def _bundle_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() and p.name == CERTIFICATE_FILE:
        return p.parent
    if not p.is_dir():
        raise BundleError("no such bundle directory", code="DG410", location=Location(str(p)))
    return p


def bundle_manifest(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every regular file under ``bundle_dir`` except signature.json, keyed by relative posix path.

    Symbolic links and special files are refused: what they point at could change without the bundle changing.
    """
    return {rel: sha256_file(full) for rel, full in _bundle_files(Path(bundle_dir)).items()}


def _bundle_files(root: Path) -> dict[str, Path]:
    """``bundle_manifest``'s files, not yet read."""
    files: dict[str, Path] = {}
    walk = os.walk(root, followlinks=False)
    while True:
        try:
            dirpath, dirnames, filenames = next(walk)
        except StopIteration:
            break
        except RecursionError:  # os.walk recurses: a tree ~1000 folders deep
            raise BundleError("folders nested too deeply to sign or verify", code="DG418",
                              location=Location(str(root))) from None
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise BundleError("symbolic links cannot be signed or verified", code="DG418",
                                  location=Location(str(full)), hint="Copy the file into the bundle instead.")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise BundleError("not a regular file", code="DG418", location=Location(str(full)))
            if rel == SIGNATURE_FILE:
                continue
            files[rel] = full
    return files


def _certificate_entry(root: Path) -> dict:
    cert_path = root / CERTIFICATE_FILE
    try:
        cert = read_json_strict(cert_path, code="DG411")
    except FileNotFoundError:
        raise BundleError("no certificate.json to sign or verify", code="DG410", location=Location(str(cert_path))) from None
    try:
        canonical = canonical_certificate(cert)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"certificate has no canonical form: {exc}", code="DG411", location=Location(str(cert_path))) from None
    return {
        "path": CERTIFICATE_FILE,
        "canonical_sha256": hashlib.sha256(canonical).hexdigest(),
        "excluded_fields": ["signature"],
    }


def _signed_payload(root: Path) -> dict:
    return {"format": PAYLOAD_FORMAT, "certificate": _certificate_entry(root), "files": bundle_manifest(root)}


def _serialise_signature(doc: dict) -> bytes:
    # One fixed layout so that the file's bytes are a function of its content (checked on read).
    return (json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# --- signing ---------------------------------------------------------------------------------
def sign_certificate(cert_path_or_dir: str | Path, key_path: str | Path | None = None, *,
                     public_key_out: str | Path | None = None) -> Path:
    """Sign a bundle's certificate and files with the Ed25519 key in ``key_path``; returns the signature.json path.

    Without ``key_path`` a fresh key is generated and thrown away, with a warning: the signature then shows that
    nothing changed after signing, but not who signed. ``public_key_out`` saves the public key (PEM).
    Sign last: any file written into the bundle afterwards makes verification fail.
    """
    root = _bundle_dir(cert_path_or_dir)
    if key_path is None:
        key = Ed25519PrivateKey.generate()
        warnings.warn(
            f"{root}: signed with a freshly generated, discarded Ed25519 key "
            f"({key_id(key.public_key())}); this proves integrity, not authorship — sign with --key for that",
            UserWarning, stacklevel=2,
        )
    else:
        key = load_private_key(key_path)
    payload = _signed_payload(root)
    pub = key.public_key()
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "Ed25519",
        "canonicalization": "RFC 8785",
        "public_key": raw_public_key(pub).hex(),
        "key_id": key_id(pub),
        "payload": payload,
        "signature": key.sign(canonical_json(payload)).hex(),
    }
    out = root / SIGNATURE_FILE
    replace_file(out, _serialise_signature(doc), tmp_dir=root.parent)  # beside the bundle: never signed itself
    if public_key_out is not None:
        _write_new(Path(public_key_out),
                   pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return out


# --- verifying -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignatureInfo:
    """What a successful check established."""

    key_id: str
    files: int
    certificate_sha256: str
    authenticated: bool  # True: checked against a key the caller supplied; False: only against the embedded key


def _sig_error(path: Path, message: str, code: str = "DG411", hint: str | None = None) -> BundleError:
    return BundleError(message, code=code, location=Location(str(path)), hint=hint)


def _read_signature(path: Path) -> tuple[dict, Ed25519PublicKey, bytes]:
    try:
        doc = read_json_strict(path, code="DG411")
    except FileNotFoundError:
        raise _sig_error(path, "the bundle is not signed (no signature.json)", "DG410",
                         "Sign it when writing it: `domainguard compile --key KEY`, `domainguard certify --key KEY`, or save_certified(..., key=KEY).") from None
    expected = {"format", "algorithm", "canonicalization", "public_key", "key_id", "payload", "signature"}
    if set(doc) != expected:
        missing, extra = sorted(expected - set(doc)), sorted(set(doc) - expected)
        raise _sig_error(path, "; ".join(([f"missing fields {missing}"] if missing else [])
                                         + ([f"unexpected fields {extra}"] if extra else [])))
    if doc["format"] != SIGNATURE_FORMAT or doc["algorithm"] != "Ed25519" or doc["canonicalization"] != "RFC 8785":
        raise _sig_error(path, f"unsupported signature format {doc['format']!r}/{doc['algorithm']!r}/{doc['canonicalization']!r}")
    pk, sig = doc["public_key"], doc["signature"]
    if not (isinstance(pk, str) and _HEX64.fullmatch(pk)) or not (isinstance(sig, str) and _HEX128.fullmatch(sig)):
        raise _sig_error(path, "public_key / signature are not lowercase hex of 32 / 64 bytes")
    if _serialise_signature(doc) != path.read_bytes():
        raise _sig_error(path, "signature.json was edited (its bytes are not the form domainguard writes)")
    pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pk))
    if doc["key_id"] != key_id(pub):
        raise _sig_error(path, "key_id does not match the embedded public key")
    payload = doc["payload"]
    if (not isinstance(payload, dict) or set(payload) != {"format", "certificate", "files"}
            or payload["format"] != PAYLOAD_FORMAT or not isinstance(payload["files"], dict)):
        raise _sig_error(path, "malformed signed payload")
    return doc, pub, bytes.fromhex(sig)


def _check(bundle_dir: str | Path, trusted: Ed25519PublicKey | None, pubkey_path: Path | None) -> SignatureInfo:
    root = _bundle_dir(bundle_dir)
    sig_path = root / SIGNATURE_FILE
    doc, embedded, sig = _read_signature(sig_path)
    if trusted is not None and raw_public_key(trusted) != raw_public_key(embedded):
        raise _sig_error(sig_path, f"signed by key {doc['key_id']}, not by the given key {key_id(trusted)}",
                         "DG413", f"Check that {pubkey_path} is the signer's published key.")
    try:
        embedded.verify(sig, canonical_json(doc["payload"]))
    except InvalidSignature:
        raise _sig_error(sig_path, "the signature does not match its signed payload (signature.json was altered)",
                         "DG414") from None
    # The payload is authentic; now every file must still be what it lists, no more, no less.
    recorded: dict = doc["payload"]["files"]
    present = _bundle_files(root)
    for rel in sorted(set(recorded) | set(present)):  # the file sets first: an added file is never read
        where = Location(str(root / rel))
        if rel not in present:
            raise BundleError("file listed in the signature is missing", code="DG416", location=where)
        if rel not in recorded:
            raise BundleError("file is not covered by the signature (added after signing)", code="DG417",
                              location=where, hint="Remove it, or re-sign the bundle.")
    for rel in sorted(recorded):
        actual = sha256_file(present[rel])
        if recorded[rel] != actual:
            raise BundleError(f"file changed after signing (sha256 {actual[:16]}…, signed {str(recorded[rel])[:16]}…)",
                              code="DG415", location=Location(str(root / rel)))
    now = _certificate_entry(root)
    if now != doc["payload"]["certificate"]:
        # Unreachable unless certificate.json escaped the file list; never let it pass silently.
        raise BundleError("canonical certificate differs from the signed one", code="DG415",
                          location=Location(str(root / CERTIFICATE_FILE)))
    return SignatureInfo(doc["key_id"], len(recorded), now["canonical_sha256"], trusted is not None)


def verify_bundle_signature(bundle_dir: str | Path, pubkey_path: str | Path) -> SignatureInfo:
    """Check that the bundle was signed by the key in ``pubkey_path`` and that no file changed since.

    Raises BundleError naming the offending file: DG410 unsigned, DG411 malformed signature.json, DG412 bad key
    file, DG413 another signer, DG414 bad signature, DG415 changed, DG416 missing, DG417 added, DG418 link.
    """
    p = Path(pubkey_path)
    return _check(bundle_dir, load_public_key(p), p)


def check_signature_integrity(bundle_dir: str | Path) -> SignatureInfo:
    """The same checks against the public key embedded in signature.json: integrity, not authorship."""
    return _check(bundle_dir, None, None)
