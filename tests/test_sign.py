"""Ed25519 signatures over a certificate and its bundle: a one-byte change anywhere fails, naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from domainguard import cli, report, signing
from domainguard.errors import BundleError
from test_report_fixtures import PROVED_POLICY, REFUTED_POLICY, add_model_evidence, compile_dir


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "keys").mkdir()
    return signing.generate_keypair(tmp_path / "keys" / "signer.pem")


@pytest.fixture
def bundle(tmp_path, keys):
    d = compile_dir(tmp_path, PROVED_POLICY, name="bundle")
    add_model_evidence(d)
    (d / "weights").mkdir()
    (d / "weights" / "model.safetensors").write_bytes(os.urandom(3000))
    report.save(d / "report.html", report.render(d, "html"))
    signing.sign_certificate(d, keys[0])
    return d


def _raises(fn, *args) -> BundleError:
    with pytest.raises(BundleError) as e:
        fn(*args)
    return e.value


# --- canonical JSON (RFC 8785) -----------------------------------------------------------------
@pytest.mark.parametrize("value, text", [
    (0.0, "0"), (-0.0, "0"), (1.0, "1"), (4.50, "4.5"), (2e-3, "0.002"), (1e-27, "1e-27"),
    (333333333.33333329, "333333333.3333333"), (1e30, "1e+30"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (5e-324, "5e-324"), (-1.5e-7, "-1.5e-7"), (0.000001, "0.000001"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (9007199254740992.0, "9007199254740992"), (123.456, "123.456"),
])
def test_jcs_numbers_follow_ecmascript(value, text):
    assert signing.canonical_json(value) == text.encode()


def test_jcs_objects_sort_by_utf16_and_escape_minimally():
    value = {"\U0001F600": 1, "\ue000": 2, "b": [True, None, "é\n\"\\\u0001"], "a": {"z": 1, "y": 2.5}}
    assert signing.canonical_json(value) == (
        '{"a":{"y":2.5,"z":1},"b":[true,null,"é\\n\\"\\\\\\u0001"],"\U0001F600":1,"\ue000":2}').encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, {"a": object()}])
def test_jcs_refuses_what_json_cannot_say(bad):
    with pytest.raises((ValueError, TypeError)):
        signing.canonical_json(bad)


def test_canonical_certificate_ignores_only_the_signature_field():
    cert = {"verdict": "PROVED", "claims": [{"id": "a"}], "signature": {"key_id": "x"}}
    assert signing.canonical_certificate(cert) == signing.canonical_certificate({**cert, "signature": {"other": 1}})
    assert signing.canonical_certificate(cert) != signing.canonical_certificate({**cert, "verdict": "UNKNOWN"})


# --- keys ----------------------------------------------------------------------------------------
def test_generate_keypair_writes_private_key_0600_and_never_overwrites(tmp_path):
    priv, pub = signing.generate_keypair(tmp_path / "k.pem")
    assert pub == tmp_path / "k.pem.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert isinstance(signing.load_private_key(priv), Ed25519PrivateKey)
    assert isinstance(signing.load_public_key(pub), Ed25519PublicKey)
    e = _raises(signing.generate_keypair, tmp_path / "k.pem")
    assert e.code == "DG419" and e.location.file.endswith("k.pem")


def test_generate_keypair_leaves_nothing_when_it_fails(tmp_path):
    e = _raises(signing.generate_keypair, tmp_path / "same.pem", tmp_path / "same.pem")
    assert e.code == "DG419" and "same file" in str(e)
    e = _raises(signing.generate_keypair, tmp_path / "k.pem", tmp_path / "missing" / "k.pub")
    assert e.code == "DG419" and "k.pub" in str(e) and "nothing was written" in str(e)
    (tmp_path / "file").write_text("x")
    e = _raises(signing.generate_keypair, tmp_path / "file" / "k.pem")
    assert e.code == "DG419"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no half of a key pair left behind


def test_public_key_formats(tmp_path):
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    raw = signing.raw_public_key(pub)
    forms = {
        "raw.bin": raw,
        "hex.txt": raw.hex().encode() + b"\n",
        "key.pub": pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "key.pem": pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "private.pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()),
    }
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
        assert signing.raw_public_key(signing.load_public_key(tmp_path / name)) == raw, name


def test_encrypted_private_key_needs_the_password(tmp_path, monkeypatch):
    key = Ed25519PrivateKey.generate()
    p = tmp_path / "enc.pem"
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"hunter2")))
    monkeypatch.delenv(signing.KEY_PASSWORD_ENV, raising=False)
    e = _raises(signing.load_private_key, p)
    assert e.code == "DG412" and signing.KEY_PASSWORD_ENV in str(e)
    monkeypatch.setenv(signing.KEY_PASSWORD_ENV, "hunter2")
    assert signing.load_private_key(p).public_key() == key.public_key()


def test_non_ed25519_or_garbage_key_names_the_key_file(tmp_path, bundle):
    from cryptography.hazmat.primitives.asymmetric import ec

    ecpub = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "ec.pem").write_bytes(ecpub.public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "junk.pem").write_text("hello")
    for name in ("ec.pem", "junk.pem", "missing.pem"):
        e = _raises(signing.verify_bundle_signature, bundle, tmp_path / name)
        assert e.code == "DG412" and e.location.file.endswith(name)


def test_signature_file_fields_are_named_missing_or_unexpected(bundle, keys):
    sig = bundle / "signature.json"
    doc = json.loads(sig.read_text())
    sig.write_text("{}")
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert "missing fields" in str(e) and "'signature'" in str(e) and "unexpected" not in str(e)
    sig.write_text(json.dumps({**doc, "extra": 1}))
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert "unexpected fields ['extra']" in str(e) and "missing" not in str(e)


# --- sign and verify -------------------------------------------------------------------------------
def test_sign_and_verify_roundtrip(bundle, keys):
    info = signing.verify_bundle_signature(bundle, keys[1])
    assert info.authenticated and info.key_id == signing.key_id(signing.load_public_key(keys[1]))
    assert info.files == 7  # policy.yaml/json, domains.json, relations.npy, certificate.json, weights, report.html
    doc = json.loads((bundle / "signature.json").read_text())
    assert set(doc["payload"]["files"]) == {"certificate.json", "domains.json", "policy.json", "policy.yaml",
                                            "relations.npy", "report.html", "weights/model.safetensors"}
    # certificate.json is signed twice over: its exact bytes and its canonical content.
    cert = json.loads((bundle / "certificate.json").read_text())
    assert doc["payload"]["certificate"]["canonical_sha256"] == \
        hashlib.sha256(signing.canonical_certificate(cert)).hexdigest()


def test_signature_checks_out_without_domainguard(bundle, keys):
    """What a third party does: hash the files, rebuild the payload, verify Ed25519 over its JCS bytes."""
    doc = json.loads((bundle / "signature.json").read_text())
    files = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != "signature.json"}
    assert files == doc["payload"]["files"]
    # JCS of this payload (strings and nested objects only) is json.dumps with sorted keys and no spaces.
    payload = json.dumps(doc["payload"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    pub = serialization.load_pem_public_key(Path(keys[1]).read_bytes())
    pub.verify(bytes.fromhex(doc["signature"]), payload)  # raises if invalid
    assert doc["key_id"] == "sha256:" + hashlib.sha256(bytes.fromhex(doc["public_key"])).hexdigest()


def test_signing_is_deterministic(bundle, keys):
    first = (bundle / "signature.json").read_bytes()
    signing.sign_certificate(bundle / "certificate.json", keys[0])
    assert (bundle / "signature.json").read_bytes() == first


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def test_one_byte_change_anywhere_fails_naming_the_file(bundle, keys):
    files = _files(bundle)
    assert len(files) == 8
    checked = 0
    for path in files:
        original = path.read_bytes()
        for pos in sorted({0, 1, len(original) // 3, len(original) // 2, len(original) - 2, len(original) - 1}):
            for new in {original[pos] ^ 0x01, original[pos] ^ 0x20, ord(" ") if original[pos] != ord(" ") else ord("\t")}:
                data = bytearray(original)
                data[pos] = new
                path.write_bytes(bytes(data))
                try:
                    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
                finally:
                    path.write_bytes(original)
                assert Path(e.location.file) == path, f"{path.name}@{pos}: {e}"
                checked += 1
    signing.verify_bundle_signature(bundle, keys[1])  # restored: clean again
    assert checked > 100


def test_added_removed_and_linked_files_fail_naming_the_file(bundle, keys):
    extra = bundle / "weights" / "extra.bin"
    extra.write_bytes(b"x")
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert e.code == "DG417" and Path(e.location.file) == extra
    extra.unlink()
    html = bundle / "report.html"
    saved = html.read_bytes()
    html.unlink()
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert e.code == "DG416" and Path(e.location.file) == html
    html.symlink_to(bundle / "policy.yaml")
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert e.code == "DG418" and Path(e.location.file) == html
    html.unlink()
    html.write_bytes(saved)
    signing.verify_bundle_signature(bundle, keys[1])


def test_other_signer_and_resigned_payload_are_refused(bundle, keys, tmp_path):
    other_priv, other_pub = signing.generate_keypair(tmp_path / "other.pem")
    e = _raises(signing.verify_bundle_signature, bundle, other_pub)
    assert e.code == "DG413" and e.location.file.endswith("signature.json")
    # An attacker edits a file and re-signs with their own key: the trusted key refuses it.
    (bundle / "policy.yaml").write_text("tampered")
    signing.sign_certificate(bundle, other_priv)
    signing.check_signature_integrity(bundle)  # internally consistent...
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert e.code == "DG413"  # ...but not by the trusted signer


def test_swapped_payload_with_valid_hashes_fails_the_signature(bundle, keys):
    sig = bundle / "signature.json"
    doc = json.loads(sig.read_text())
    (bundle / "policy.yaml").write_text("tampered")
    doc["payload"]["files"]["policy.yaml"] = hashlib.sha256(b"tampered").hexdigest()
    sig.write_bytes(signing._serialise_signature(doc))
    e = _raises(signing.verify_bundle_signature, bundle, keys[1])
    assert e.code == "DG414" and e.location.file.endswith("signature.json")


def test_unsigned_bundle(tmp_path, keys):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="unsigned")
    e = _raises(signing.verify_bundle_signature, d, keys[1])
    assert e.code == "DG410" and e.location.file.endswith("signature.json")
    e = _raises(signing.sign_certificate, tmp_path / "nowhere", keys[0])
    assert e.code == "DG410"


def test_ephemeral_key_warns_and_still_protects_integrity(tmp_path):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="ephemeral")
    with pytest.warns(UserWarning, match="integrity, not authorship"):
        signing.sign_certificate(d, public_key_out=tmp_path / "ephemeral.pub")
    info = signing.check_signature_integrity(d)
    assert not info.authenticated
    assert signing.verify_bundle_signature(d, tmp_path / "ephemeral.pub").authenticated
    (d / "domains.json").write_text("{}")
    e = _raises(signing.check_signature_integrity, d)
    assert e.code == "DG415" and e.location.file.endswith("domains.json")


# --- what the report and the CLI make of it ------------------------------------------------------
def test_report_shows_signature_state(bundle, keys):
    data = report.build(bundle)
    sig = data["integrity"]["signature"]
    assert sig["status"] == "intact" and sig["key_id"] == signing.key_id(signing.load_public_key(keys[1]))
    assert data["verdict"]["shown"] == "PROVED"
    (bundle / "report.html").write_text("<p>edited</p>")
    data = report.build(bundle)
    assert data["integrity"]["signature"]["status"] == "invalid" and "report.html" in data["integrity"]["signature"]["detail"]
    assert data["verdict"]["shown"] == "UNKNOWN"


def test_cli_verify_with_pubkey(bundle, keys, capsys):
    assert cli.main(["verify", str(bundle), "--pubkey", str(keys[1])]) == 0
    (bundle / "weights" / "model.safetensors").write_bytes(b"\0" * 3000)
    capsys.readouterr()
    assert cli.main(["verify", str(bundle), "--pubkey", str(keys[1])]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_cli_verify_checks_one_state_of_the_folder(bundle, keys, tmp_path, monkeypatch, capsys):
    """`verify DIR --pubkey` used to read the folder twice: the files and proofs, then the signature. A
    folder holding a self-consistent forgery (its own key's signature) while the first read ran, and the
    signed original while the second did, verified as authenticated. Now every check reads one private
    copy: the forgery's signature is checked, and fails against the trusted key."""
    import shutil

    from domainguard import artifact

    forged = compile_dir(tmp_path, PROVED_POLICY.replace("name:", "name: forged-", 1), name="forged")
    (tmp_path / "mallory").mkdir()
    mallory = signing.generate_keypair(tmp_path / "mallory" / "k.pem")
    signing.sign_certificate(forged, mallory[0])
    genuine = tmp_path / "genuine"
    shutil.copytree(bundle, genuine)
    target = tmp_path / "target"
    shutil.copytree(forged, target)
    real = artifact.load_dir
    seen = []

    def load_then_swap(path):
        seen.append(Path(path))
        out = real(path)
        shutil.rmtree(target)  # the folder now holds the signed original
        shutil.copytree(genuine, target)
        return out

    monkeypatch.setattr(artifact, "load_dir", load_then_swap)
    assert cli.main(["verify", str(target), "--pubkey", str(keys[1])]) == 2
    err = capsys.readouterr().err
    assert "signature" in err and str(target) in err, err
    assert seen and seen[0] != target  # the checks read a copy, and errors name the folder, not the copy
    monkeypatch.setattr(artifact, "load_dir", real)
    assert cli.main(["verify", str(target), "--pubkey", str(keys[1]), "--json"]) == 0  # the original verifies
    capsys.readouterr()


def test_cli_verify_reports_added_files_and_links_under_their_own_paths(tmp_path, capsys):
    """Checked on a private copy, an added file and a link still refute an unsigned directory, named by their
    paths in the folder (not the copy's); the link is not followed."""
    d = compile_dir(tmp_path, PROVED_POLICY, name="plain")
    capsys.readouterr()
    assert cli.main(["verify", str(d), "--json"]) == 0
    capsys.readouterr()
    (d / "extra.txt").write_text("added after compiling")
    (tmp_path / "elsewhere.json").write_text("{}")
    (d / "link.json").symlink_to(tmp_path / "elsewhere.json")
    assert cli.main(["verify", str(d), "--json"]) == 1
    report_ = json.loads(capsys.readouterr().out)
    assert "domainguard-load-" not in json.dumps(report_)  # no claim, location or finding names the copy
    artifact = next(c for c in report_["claims"] if c["id"] == "artifact")
    assert artifact["status"] == "REFUTED"
    assert f"{d / 'extra.txt'}: not part of the certified directory" in artifact["reason"]
    assert f"{d / 'link.json'}: a link or special file" in artifact["reason"]


def test_signing_never_writes_through_a_planted_link(tmp_path, keys):
    """The signature used to be written to PARENT/.NAME.signature.json.tmp: a link planted there had its
    target overwritten with the signature and then moved into the bundle."""
    d = compile_dir(tmp_path, PROVED_POLICY, name="bundle")
    victim = tmp_path / "victim.txt"
    victim.write_text("the signer's file")
    (tmp_path / ".bundle.signature.json.tmp").symlink_to(victim)
    signing.sign_certificate(d, keys[0])
    assert victim.read_text() == "the signer's file"
    assert not (d / "signature.json").is_symlink() and signing.verify_bundle_signature(d, keys[1]).authenticated
    (tmp_path / "planted.pub").symlink_to(victim)
    e = _raises(lambda: signing.sign_certificate(d, keys[0], public_key_out=tmp_path / "planted.pub"))
    assert e.code == "DG419" and victim.read_text() == "the signer's file"


def test_report_reads_no_file_outside_the_directory(bundle, tmp_path):
    """A certificate naming ../x or /abs/x used to have the report print that file's digest."""
    outside = tmp_path / "outside.txt"
    outside.write_text("a local secret")
    cert = json.loads((bundle / "certificate.json").read_text())
    cert["subject"]["files"]["../outside.txt"] = "0" * 64
    cert["subject"]["extra"] = {"file": str(outside), "sha256": "0" * 64}
    (bundle / "certificate.json").write_text(json.dumps(cert))
    data = report.build(bundle)
    rows = [r for r in data["integrity"]["files"] if "outside" in r["item"]]
    assert len(rows) == 2 and all(r["actual"] is None and r["status"] == "mismatch" for r in rows)
    assert hashlib.sha256(outside.read_bytes()).hexdigest() not in json.dumps(data)
    assert data["verdict"]["shown"] != "PROVED"


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_reports_and_signatures_get_the_mode_a_new_file_gets_under_the_umask(tmp_path, keys, mask):
    """A report or signature written atomically is private only while it is written: a regulator's copy of
    a report was 0600 under umask 022 (mkstemp's mode) where every other file of the bundle was 0644."""
    d = compile_dir(tmp_path, PROVED_POLICY, name=f"modes{mask:o}")
    old = os.umask(mask)
    try:
        report.save(tmp_path / "report.md", report.render(d, "md"))
        signing.sign_certificate(d, keys[0])
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == want
    assert stat.S_IMODE((d / "signature.json").stat().st_mode) == want
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the umask is read from /proc on Linux")
def test_reading_the_umask_never_changes_it(monkeypatch):
    """Writing a report or signature reads the umask; setting it to read it would, for a moment, give files
    other threads create mode 0666 (a reviewer saw 11 of 20 000 such files)."""
    from domainguard import artifact

    old = os.umask(0o027)
    try:
        def changed(mask):
            raise AssertionError(f"the umask was set to {mask:o} to read it")

        monkeypatch.setattr(artifact.os, "umask", changed)
        assert artifact._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)
