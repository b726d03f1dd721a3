"""A real certified bundle (tiny Llama): signed, reported on, verified offline, and refused when touched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import domainguard as dg
from domainguard import cli, report, signing
from domainguard.errors import BundleError
from domainguard.guard import guard_state

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

POLICY = """# a small policy for a signed bundle
domainguard: 1
name: signed-bundle
domains:
  system: {}
  docs: {description: Retrieved documents}
  secret: {description: Internal only}
  answer: {}
reads:
  docs: [system]
  secret: [system]
  answer: [system, docs]
forbid:
  - flow: {from: secret, to: answer}
  - combine: [docs, secret]
patterns:
  default: {causal: true}
generation: {domain: answer}
positions: per_domain
"""


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """One certified, signed bundle (certification traces and leak-tests the model: do it once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128)).eval()
        guarded = dg.guard(model, dg.compile(dg.loads_policy(POLICY), layers=2))
        root = tmp_path_factory.mktemp("signed")
        path = dg.save_certified(guarded, root / "bundle", trials=8, generate_tokens=2)
    finally:
        torch.set_num_threads(threads)
    priv, pub = signing.generate_keypair(root / "signer.pem")
    signing.sign_certificate(path, priv)
    return path, pub


@pytest.fixture
def copy(signed, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(signed[0], target)
    return target, signed[1]


def _flip_a_bit(f: Path) -> Path:
    """Flip one bit in the middle of file ``f``; return ``f``."""
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f


def test_bundle_report_shows_model_evidence_and_a_proved_verdict(signed):
    path, pub = signed
    data = report.build(path)
    assert data["verdict"]["shown"] == "PROVED", data["verdict"]["reasons"]
    assert data["integrity"]["signature"]["status"] == "intact"
    assert data["integrity"]["signature"]["key_id"] == signing.key_id(signing.load_public_key(pub))
    assert {r["status"] for r in data["integrity"]["files"]} == {"match"}
    assert data["audit"]["clean"] is True and data["leak_test"]["guarded_rate"] == 0.0
    assert data["leak_test"]["dense_rate"] > 0, "the dense model must show the test can see a leak"
    kinds = {c["kind"] for c in data["claims"]}
    assert {"flow", "combine", "graph-audit", "empirical-isolation"} <= kinds
    html = report.to_html(data)
    for needle in ("LlamaForCausalLM", "guarded model", "dense model", "model/model.safetensors",
                   "Signature: intact"):
        assert needle in html, needle
    pdf = report.to_pdf(data)
    assert pdf.startswith(b"%PDF")


def test_signed_bundle_verifies_offline_and_loads(signed):
    path, pub = signed
    assert signing.verify_bundle_signature(path, pub).authenticated
    assert cli.main(["verify", str(path), "--pubkey", str(pub)]) == 0
    model = dg.load_certified(path, pubkey=str(pub))
    assert model is not None


@pytest.mark.parametrize("victim", ["model/model.safetensors", "manifest.json", "certificate.json",
                                    "report/report.html", "relations.npy", "signature.json"])
def test_one_byte_change_in_a_certified_bundle_names_the_file(copy, victim):
    path, pub = copy
    f = _flip_a_bit(path / victim)
    with pytest.raises(BundleError) as e:
        signing.verify_bundle_signature(path, pub)
    assert e.value.location.file == str(f)


def test_sarif_of_a_proved_bundle_has_no_errors(signed):
    log = json.loads(report.render(signed[0], "sarif"))
    assert [r for r in log["runs"][0]["results"] if r["level"] == "error"] == []
    assert log["runs"][0]["properties"]["verdict"] == "PROVED"


def test_checks_and_the_load_read_one_private_copy(copy, monkeypatch):
    """Between the signature check, the byte checks and the load, whoever may write beside the bundle could
    swap it (measured: an attacker's self-signed bundle loaded with authenticated=True in 10 of 10 races) or
    rewrite model/config.json after its last hash (a relu model loaded as the certified silu one). Every
    read now goes to one private copy made first: changes to the folder after that reach nothing."""
    from domainguard import bundle as B

    path, pub = copy
    seen = []
    real_sig, real_check = signing.verify_bundle_signature, B.check_bundle

    def sig(root, key):
        seen.append(("signature", str(root)))
        return real_sig(root, key)

    def check(root, **kw):
        seen.append(("bytes", str(root)))
        out = real_check(root, **kw)
        cfg = path / "model" / "config.json"  # the folder changes once its checks have passed
        cfg.write_text(cfg.read_text().replace('"silu"', '"relu"'))
        return out

    monkeypatch.setattr(signing, "verify_bundle_signature", sig)
    monkeypatch.setattr(B, "check_bundle", check)
    model = dg.load_certified(path, pubkey=str(pub))
    assert model.config.hidden_act == "silu" and "relu" in (path / "model" / "config.json").read_text()
    assert guard_state(model).authenticated
    (_, a), (_, b) = seen
    assert a == b and not a.startswith(str(path)), seen
    assert not Path(a).parent.exists(), "the private copy is removed"


def test_a_load_error_names_the_bundle_not_the_private_copy(copy):
    path, pub = copy
    f = path / "relations.npy"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    with pytest.raises(BundleError) as e:
        dg.load_certified(path, pubkey=str(pub))
    assert e.value.location.file == str(f) and str(path) in str(e.value)


def test_an_added_or_deeply_nested_file_is_refused_before_anything_is_copied(copy, monkeypatch):
    from domainguard import bundle as B

    path, pub = copy
    copied = []
    monkeypatch.setattr(B, "_copy_file", lambda *a: copied.append(a))
    (path / "zzz.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(BundleError) as e:
        dg.load_certified(path, pubkey=str(pub))
    assert e.value.code == "DG444" and e.value.location.file == str(path / "zzz.bin") and copied == []
    (path / "zzz.bin").unlink()
    deep = path / "/".join("d" * 12)
    deep.mkdir(parents=True)
    with pytest.raises(BundleError) as e:
        dg.load_certified(path)
    assert e.value.code == "DG446" and copied == []


def test_a_load_hashes_each_file_once_as_it_is_copied(copy, monkeypatch):
    """The signature check and the byte checks used to hash every file of the private copy again, each of
    them (the weights twice more after copying them). The copy now hashes what it writes, and the checks
    use those digests: no file of the copy is read to be hashed."""
    from domainguard import certificate

    path, pub = copy
    hashed = []
    real = certificate._hash_file
    monkeypatch.setattr(certificate, "_hash_file", lambda p: hashed.append(str(p)) or real(p))
    model = dg.load_certified(path, pubkey=str(pub))
    assert guard_state(model).authenticated
    assert [p for p in hashed if "domainguard-load-" in p] == []
    assert cli.main(["verify", str(path), "--pubkey", str(pub)]) == 0
    assert [p for p in hashed if "domainguard-load-" in p] == []


@pytest.mark.parametrize("victim", ["model/model.safetensors", "model/config.json", "manifest.json",
                                    "certificate.json", "signature.json"])
def test_a_byte_changed_before_the_copy_still_fails_the_load(copy, victim):
    """The digests the checks use are those of the copied bytes, not of what the manifest expects."""
    path, pub = copy
    f = _flip_a_bit(path / victim)
    with pytest.raises(BundleError) as e:
        dg.load_certified(path, pubkey=str(pub))
    assert e.value.location.file == str(f), e.value


def test_a_changed_weight_fails_the_byte_checks_and_verify_through_the_copy(copy, capsys):
    """Without a signature the manifest's digests are what catches a change: compared with the digests
    recorded while copying (the load), and by the CLI's verify."""
    path, _ = copy
    f = _flip_a_bit(path / "model" / "model.safetensors")
    assert cli.main(["verify", str(path)]) != 0
    assert f"{f}: error DG415" in capsys.readouterr().err  # the signature's digests, first
    (path / "signature.json").unlink()
    assert cli.main(["verify", str(path)]) != 0
    out = capsys.readouterr().out.replace("\n", "")  # then the manifest's: a problem of a REFUTED verdict
    assert f"{f}: contents changed since certification" in out and "verdict: REFUTED" in out
    with pytest.raises(BundleError) as e:
        dg.load_certified(path)
    assert e.value.code == "DG443" and e.value.location.file == str(f)


def test_a_recorded_digest_stands_only_while_the_file_is_unchanged(tmp_path):
    import hashlib

    from domainguard import certificate

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    ident = certificate.file_identity(os.stat(f))
    with certificate.hashed_copies({os.path.abspath(f): (ident, "0" * 64)}):
        assert certificate.sha256_file(f) == "0" * 64  # answered from the record
        f.write_bytes(b"b" * 101)  # another size
        assert certificate.sha256_file(f) == hashlib.sha256(b"b" * 101).hexdigest()
        ident = certificate.file_identity(os.stat(f))
        os.utime(f, ns=(ident[3] + 10**9, ident[3] + 10**9))  # same bytes and size, another time
        with certificate.hashed_copies({os.path.abspath(f): (ident, "1" * 64)}):
            assert certificate.sha256_file(f) == hashlib.sha256(b"b" * 101).hexdigest()
        ident = certificate.file_identity(os.stat(f))
        other = tmp_path / "new.bin"
        other.write_bytes(b"c" * 101)  # same size, another file moved over the path
        os.replace(other, f)
        with certificate.hashed_copies({os.path.abspath(f): (ident, "2" * 64)}):
            assert certificate.sha256_file(f) == hashlib.sha256(b"c" * 101).hexdigest()
    assert certificate.sha256_file(f) == hashlib.sha256(b"c" * 101).hexdigest()


def test_a_tree_too_deep_for_recursion_is_a_bundle_error(copy):
    import sys

    path, pub = copy
    d = path
    for _ in range(400):  # deeper than the recursion limit below, shallow enough for tmp_path's cleanup
        d = d / "d"
        d.mkdir()
    (d / "f").write_bytes(b"x")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        with pytest.raises(BundleError) as e:
            signing.verify_bundle_signature(path, pub)
    finally:
        sys.setrecursionlimit(limit)
    assert e.value.code == "DG418"


def test_an_added_file_is_refused_before_it_is_hashed(copy, monkeypatch):
    path, pub = copy
    (path / "huge.bin").write_bytes(b"\0" * 1000)
    hashed = []
    real = signing.sha256_file
    monkeypatch.setattr(signing, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    with pytest.raises(BundleError) as e:
        signing.verify_bundle_signature(path, pub)
    assert e.value.code == "DG417" and str(path / "huge.bin") not in hashed


def test_a_bundle_is_private_until_it_is_complete(signed, tmp_path, monkeypatch):
    """The folder a bundle is built in is 0700 until it is signed and moved into place: under umask 002 in a
    group folder a group member rewrote model/config.json mid-build and the signer's key signed it."""
    from domainguard import artifact

    modes = []
    real = artifact.replace_dir

    def spy(tmp, target):
        modes.append(tmp.stat().st_mode & 0o777)
        real(tmp, target)

    monkeypatch.setattr("domainguard.bundle.replace_dir", spy)
    old = os.umask(0o002)
    try:
        model = dg.load_certified(signed[0])
        out = dg.save_certified(model, tmp_path / "again", certificate=guard_state(model).certificate)
    finally:
        os.umask(old)
    assert modes == [0o700] and out.stat().st_mode & 0o777 == 0o775
