"""Certified bundles: round trip, atomic writes, refusal, and every byte of every file is checked on load."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import domainguard as dg
from domainguard.bundle import (
    MANIFEST,
    build_certificate,
    certify_cli,
    check_bundle,
    load_certified,
    save_certified,
    tensors_digest,
)
from domainguard.errors import BundleError, PolicyError
from domainguard.guard import guard_state

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

POLICY = """# a small policy for bundle tests
domainguard: 1
name: bundle-test
domains:
  system: {}
  docs: {}
  secret: {}
  answer: {}
reads:
  docs: [system]
  secret: [system]
  answer: [system, docs]
forbid:
  - flow: {from: secret, to: answer}
patterns:
  default: {causal: true}
generation: {domain: answer}
positions: per_domain
"""
LEAKY = POLICY.replace("answer: [system, docs]", "answer: [system, docs, secret]")
LAYERS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def guarded(text=POLICY):
    return dg.guard(tiny_llama(), dg.compile(dg.loads_policy(text), layers=LAYERS))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """One certified bundle (building a certificate traces and leak-tests the model: do it once)."""
    model = guarded()
    cert = build_certificate(model, trials=12, generate_tokens=2)
    path = save_certified(model, tmp_path_factory.mktemp("b") / "bundle", certificate=cert)
    return path, model, cert


@pytest.fixture
def copy_of(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle[0], target)
    return target


def listed(path):
    return sorted(json.loads((Path(path) / MANIFEST).read_text())["files"])


def bundle_error(path):
    with pytest.raises(BundleError) as e:
        load_certified(path)
    return e.value


# --- round trip ---------------------------------------------------------------------------------
def test_bundle_holds_weights_tables_policy_certificate_and_report(bundle):
    path, model, cert = bundle
    files = listed(path)
    for name in ("policy.yaml", "policy.json", "domains.json", "relations.npy", "certificate.json",
                 "model/model.safetensors", "model/config.json"):
        assert name in files
    assert any(f.startswith("report/") for f in files)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    data = json.loads((path / "certificate.json").read_text())
    assert data["verdict"] == "PROVED"
    claims = {c["id"]: c for c in data["claims"]}
    assert claims["graph-audit"]["status"] == "PROVED" and claims["graph-audit"]["method"]["name"] == "trace"
    assert claims["leak-test"]["status"] == "PROVED" and claims["leak-test"]["method"]["name"] == "empirical"
    assert data["audit"]["clean"] is True
    assert data["leak_test"]["leakage_rate"]["guarded"] == 0.0
    assert data["leak_test"]["leakage_rate"]["dense"] > 0.0
    assert data["leak_test"]["position_channel"]["changed"] is False  # per_domain positions
    assert data["subject"]["weights"]["tensors_sha256"] == tensors_digest(model)
    assert data["subject"]["kernels"]["sha256"] and "forward.py" in data["subject"]["kernels"]["files"]
    assert set(data["subject"]["files"]) <= set(files)
    # Translation validation of the tables the model runs, with its scope: Z3 per tile size over every layout
    # up to the context length, the length-free rules, and an exhaustive re-check of the leak-test layout.
    assert data["scope"]["block_size"] == [128, 64] and data["scope"]["max_seq_len"] > 0
    for kind in ("tiles-sound", "decode-alignment"):
        proofs = [c for c in data["claims"] if c["kind"] == kind]
        assert sorted(c["scope"]["block_size"] for c in proofs) == [[64, 64], [128, 128]], kind
        assert all(c["status"] == "PROVED" and c["method"]["name"] == "z3" for c in proofs)
        assert all(c["scope"]["max_seq_len"] == data["scope"]["max_seq_len"] for c in proofs)
    assert claims["tile-rules-sound"]["status"] == claims["patterns-within-policy"]["status"] == "PROVED"
    exhaustive = [c for c in data["claims"] if c["id"].startswith("tables-exhaustive[")]
    assert len(exhaustive) == 2 and all(c["status"] == "PROVED" for c in exhaustive)
    assert all(c["scope"]["layers"] == list(range(LAYERS)) and c["details"]["tiles"] > 0 for c in exhaustive)
    assert data["tools"]["transformers"]


def test_load_certified_gives_back_the_same_guarded_model(bundle):
    path, model, cert = bundle
    loaded = load_certified(path)
    state = guard_state(loaded)
    assert state.certificate.verdict == "PROVED"
    assert state.compiled.tables_digest == guard_state(model).compiled.tables_digest
    doms = torch.tensor([[0, 0, 2, 2, 1, 3, 3]])
    ids = torch.randint(0, 97, doms.shape)
    assert torch.equal(loaded(input_ids=ids, domain_ids=doms).logits, model(input_ids=ids, domain_ids=doms).logits)


def test_domainguard_verify_accepts_a_bundle(bundle):
    from domainguard.cli import main

    assert main(["verify", str(bundle[0])]) == 0


# --- tampering ----------------------------------------------------------------------------------
def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_is_checked_byte_for_byte(bundle, tmp_path):
    names = listed(bundle[0]) + [MANIFEST]
    assert len(names) >= 10
    for name in names:
        target = tmp_path / name.replace("/", "_")
        shutil.copytree(bundle[0], target)
        flip_byte(target / name)
        err = bundle_error(target)
        assert Path(name).name in str(err), (name, str(err))
        assert err.code.startswith("DG4"), err.code


def test_an_added_file_is_refused(copy_of):
    (copy_of / "model" / "extra.bin").write_bytes(b"\0")
    err = bundle_error(copy_of)
    assert err.code == "DG444" and "extra.bin" in str(err)


def test_an_added_top_level_file_is_refused(copy_of):
    (copy_of / "notes.txt").write_text("hello")
    assert bundle_error(copy_of).code == "DG444"


@pytest.mark.parametrize("name", ["model/model.safetensors", "relations.npy", "certificate.json", "report/report.md",
                                  "policy.yaml", MANIFEST])
def test_a_removed_file_is_refused(copy_of, name):
    if not (copy_of / name).exists():
        pytest.skip(f"{name} not in this bundle")
    (copy_of / name).unlink()
    err = bundle_error(copy_of)
    assert err.code == "DG445" and Path(name).name in str(err)


def test_a_symlink_is_refused(copy_of):
    (copy_of / "link").symlink_to(copy_of / "policy.yaml")
    assert bundle_error(copy_of).code == "DG446"


def test_a_consistently_forged_manifest_still_fails_on_the_tables(copy_of):
    """Rewrite relations.npy AND the manifest (and certificate file list): re-deriving the tables catches it."""
    import numpy as np

    from domainguard.bundle import _manifest_bytes, _sha256_file

    rel = np.load(copy_of / "relations.npy")
    rel[:] = True  # everybody reads everybody
    with open(copy_of / "relations.npy", "wb") as f:
        np.save(f, rel, allow_pickle=False)
    from domainguard.certificate import Certificate

    cert = Certificate.load(copy_of / "certificate.json")
    cert.subject["files"]["relations.npy"] = _sha256_file(copy_of / "relations.npy")
    (copy_of / "certificate.json").write_text(cert.to_json())
    files = {p.relative_to(copy_of).as_posix(): _sha256_file(p) for p in copy_of.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    (copy_of / MANIFEST).write_bytes(_manifest_bytes(files))
    err = bundle_error(copy_of)
    assert err.code == "DG448" and "relations.npy" in str(err)


def test_a_forged_policy_fails_on_the_policy_digest(copy_of):
    from domainguard.bundle import _manifest_bytes, _sha256_file
    from domainguard.certificate import Certificate

    (copy_of / "policy.yaml").write_text(LEAKY)
    cert = Certificate.load(copy_of / "certificate.json")
    cert.subject["files"]["policy.yaml"] = _sha256_file(copy_of / "policy.yaml")
    (copy_of / "certificate.json").write_text(cert.to_json())
    files = {p.relative_to(copy_of).as_posix(): _sha256_file(p) for p in copy_of.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    (copy_of / MANIFEST).write_bytes(_manifest_bytes(files))
    err = bundle_error(copy_of)
    assert err.code == "DG448" and "policy.yaml" in str(err)


def test_signed_bundle_loads_with_the_key_and_a_tampered_signature_does_not(bundle, tmp_path):
    from domainguard.signing import generate_keypair

    priv, pub = generate_keypair(tmp_path / "key.pem")
    path, model, cert = bundle
    signed = save_certified(model, tmp_path / "signed", certificate=cert, key=priv)
    assert (signed / "signature.json").is_file()
    load_certified(signed, pubkey=str(pub))
    check_bundle(signed)
    flip_byte(signed / "signature.json")
    with pytest.raises(BundleError) as e:
        load_certified(signed)
    assert "signature.json" in str(e.value)


# --- forged bundles: consistent digests, claims that fall short ------------------------------------
def forge(root: Path, *, cert_edit=None) -> None:
    """Re-write the certificate (after ``cert_edit(dict)``) and the manifest so that every digest matches
    the files as they are now: what anyone can do to an unsigned bundle."""
    from domainguard.bundle import _manifest_bytes, _sha256_file
    from domainguard.certificate import Certificate

    data = json.loads((root / "certificate.json").read_text())
    for rel in list(data["subject"]["files"]):
        if (root / rel).is_file():
            data["subject"]["files"][rel] = _sha256_file(root / rel)
    if cert_edit is not None:
        cert_edit(data)
    (root / "certificate.json").write_text(Certificate.model_validate(data).to_json())
    files = {p.relative_to(root).as_posix(): _sha256_file(p) for p in root.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_bytes(_manifest_bytes(files))


def cli_verify(path, capsys) -> tuple[int, str]:
    from domainguard.cli import main

    capsys.readouterr()
    code = main(["verify", str(path)])
    got = capsys.readouterr()
    return code, got.out + got.err


def test_forging_the_digests_is_not_enough_to_load(copy_of):
    forge(copy_of)  # the honest content, digests rewritten: still loads
    load_certified(copy_of)


@pytest.mark.parametrize("how", ["leak-test refuted", "claims removed", "audit removed"])
def test_a_certificate_that_claims_less_does_not_load_or_verify(copy_of, capsys, how):
    def edit(c):
        if how == "leak-test refuted":
            next(x for x in c["claims"] if x["id"] == "leak-test")["status"] = "REFUTED"  # verdict still PROVED
        elif how == "claims removed":
            c["claims"] = []
        else:
            c["claims"] = [x for x in c["claims"] if x["id"] != "graph-audit"]

    forge(copy_of, cert_edit=edit)
    err = bundle_error(copy_of)
    assert err.code == "DG450" and "certificate.json" in str(err)
    code, text = cli_verify(copy_of, capsys)
    assert code == 1 and "certificate" in text


def test_a_leaky_policy_with_its_own_tables_does_not_load(copy_of, capsys):
    """Policy, canonical policy, tables and every digest replaced consistently by a policy that breaks its
    own forbid rule: re-verifying the policy at load refuses it."""
    from domainguard.artifact import write_tables

    leaky = dg.compile(dg.loads_policy(LEAKY), layers=LAYERS)
    write_tables(leaky, copy_of)

    def edit(c):
        c["subject"]["policy"]["sha256"] = leaky.policy_digest
        c["subject"]["tables"]["sha256"] = leaky.tables_digest

    forge(copy_of, cert_edit=edit)
    err = bundle_error(copy_of)
    assert err.code == "DG452" and "policy.yaml" in str(err) and "REFUTED" in str(err)
    assert cli_verify(copy_of, capsys)[0] == 1


def test_kernels_other_than_the_certified_ones_do_not_load(copy_of, monkeypatch):
    import domainguard.artifact as artifact

    real = artifact.kernel_subject
    monkeypatch.setattr(artifact, "kernel_subject", lambda c: {**real(c), "sha256": "0" * 64})
    err = bundle_error(copy_of)
    assert err.code == "DG453" and "kernels" in str(err)


@pytest.mark.parametrize("edit", [
    lambda c: c["subject"]["weights"].update(dtype="bogus"),
    lambda c: c["subject"]["weights"].update(dtype="load"),
    lambda c: c["subject"].update(weights="model.safetensors"),
    lambda c: c["subject"]["weights"].update(format="pickle"),
])
def test_forged_weight_records_are_refused_cleanly(copy_of, edit):
    forge(copy_of, cert_edit=edit)
    assert bundle_error(copy_of).code == "DG449"


def test_pickled_weights_are_never_loaded(copy_of):
    (copy_of / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    forge(copy_of, cert_edit=lambda c: c["subject"]["files"].update(
        {"model/pytorch_model.bin": "0" * 64}))
    forge(copy_of)
    err = bundle_error(copy_of)
    assert err.code == "DG449" and "pytorch_model.bin" in str(err)


@pytest.mark.parametrize("name", [MANIFEST, "certificate.json", "signature.json"])
def test_json_nested_too_deeply_is_a_clear_error(copy_of, capsys, name):
    (copy_of / name).write_text("[" * 200_000)
    err = bundle_error(copy_of)
    assert err.code.startswith("DG4") and name in str(err)
    code, text = cli_verify(copy_of, capsys)
    assert code in (1, 2) and "Traceback" not in text and "RecursionError" not in text


def test_a_manifest_naming_a_path_outside_the_bundle_says_so(copy_of):
    from domainguard.bundle import _manifest_bytes

    files = json.loads((copy_of / MANIFEST).read_text())["files"]
    (copy_of / MANIFEST).write_bytes(_manifest_bytes({**files, "../outside.txt": "0" * 64}))
    err = bundle_error(copy_of)
    assert err.code == "DG441" and "not inside the bundle" in str(err)


@pytest.mark.parametrize("tamper", ["certificate", "report", "added", "manifest removed", "symlink"])
def test_cli_verify_checks_every_file_of_an_unsigned_bundle(copy_of, capsys, tamper):
    if tamper == "certificate":
        text = (copy_of / "certificate.json").read_text()
        (copy_of / "certificate.json").write_text(text.replace("PROVED", "PROVED ", 1).replace("PROVED \"", "PROVED\"", 1)
                                                  .replace("\n }", "\n  }", 1))
    elif tamper == "report":
        flip_byte(next((copy_of / "report").iterdir()))
    elif tamper == "added":
        (copy_of / "model" / "extra.py").write_text("print('hi')")
    elif tamper == "manifest removed":
        (copy_of / MANIFEST).unlink()
    else:
        (copy_of / "link").symlink_to("/etc/hostname")
    code, text = cli_verify(copy_of, capsys)
    assert code == 1, text


def test_a_loaded_bundle_says_whether_its_signer_was_checked(bundle, tmp_path):
    from domainguard.signing import generate_keypair

    priv, pub = generate_keypair(tmp_path / "key.pem")
    path, model, cert = bundle
    assert guard_state(load_certified(path)).authenticated is False
    signed = save_certified(model, tmp_path / "signed", certificate=cert, key=priv)
    assert guard_state(load_certified(signed)).authenticated is False
    assert guard_state(load_certified(signed, pubkey=str(pub))).authenticated is True


# --- writing: refusal and atomicity --------------------------------------------------------------
def test_a_refuted_policy_is_not_certified_and_nothing_is_written(tmp_path):
    model = guarded(LEAKY)
    cert = build_certificate(model, trials=6, generate_tokens=0)
    assert cert.verdict == "REFUTED"
    with pytest.raises(BundleError) as e:
        save_certified(model, tmp_path / "out", certificate=cert)
    assert e.value.code == "DG450"
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_nothing_behind(bundle, tmp_path, monkeypatch):
    path, model, cert = bundle

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_certified(model, tmp_path / "out", certificate=cert)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rewrite_keeps_the_old_bundle(bundle, copy_of, monkeypatch):
    path, model, cert = bundle
    before = {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file()}
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        save_certified(model, copy_of, certificate=cert)
    assert {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in copy_of.parent.iterdir()) == ["copy"]


def test_rewriting_a_bundle_replaces_it_but_never_a_file_added_to_it(bundle, copy_of):
    path, model, cert = bundle
    save_certified(model, copy_of, certificate=cert)
    check_bundle(copy_of)
    (copy_of / "notes.txt").write_text("mine")
    with pytest.raises(BundleError) as e:
        save_certified(model, copy_of, certificate=cert)
    assert e.value.code == "DG451" and "notes.txt" in str(e.value)
    assert (copy_of / "notes.txt").read_text() == "mine"


def test_a_folder_that_is_not_a_bundle_is_never_replaced(bundle, tmp_path):
    path, model, cert = bundle
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(BundleError) as e:
        save_certified(model, tmp_path / "mine", certificate=cert)
    assert e.value.code == "DG451"
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_a_folder_with_someone_elses_manifest_is_never_replaced(bundle, tmp_path):
    path, model, cert = bundle
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / MANIFEST).write_text('{"name": "my web app", "icons": []}')
    (tmp_path / "webapp" / "index.html").write_text("<html>precious</html>")
    with pytest.raises(BundleError) as e:
        save_certified(model, tmp_path / "webapp", certificate=cert)
    assert e.value.code == "DG451"
    assert (tmp_path / "webapp" / "index.html").read_text() == "<html>precious</html>"


def test_load_of_something_that_is_not_a_bundle(tmp_path):
    assert bundle_error(tmp_path / "nope").code == "DG440"
    (tmp_path / "empty").mkdir()
    assert bundle_error(tmp_path / "empty").code == "DG445"


# --- the certify command ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    tiny_llama().save_pretrained(d)
    return d


def test_certify_cli_writes_a_bundle(model_dir, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    assert certify_cli(str(model_dir), str(policy), None, str(tmp_path / "out")) == 0
    cert, compiled = check_bundle(tmp_path / "out")
    assert cert.subject["policy"]["file"] == str(policy)
    assert (tmp_path / "out" / "policy.yaml").read_text() == POLICY  # the source, byte for byte
    load_certified(tmp_path / "out")


def test_certify_cli_refutes_a_leaky_policy(model_dir, tmp_path):
    policy = tmp_path / "leaky.yaml"
    policy.write_text(LEAKY)
    assert certify_cli(str(model_dir), str(policy), None, str(tmp_path / "out")) == 1
    assert not (tmp_path / "out").exists()


def test_certify_cli_refuses_a_model_with_a_sequence_mixer(model_dir, tmp_path):
    class CumSum(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x) + x.cumsum(1)

    model = guarded()
    model.model.layers[0].mlp = CumSum(model.model.layers[0].mlp)
    cert = build_certificate(model, trials=6, generate_tokens=0)
    assert cert.verdict == "REFUTED"
    audit = next(c for c in cert.claims if c.id == "graph-audit")
    assert audit.status == "REFUTED" and audit.witness[0]["module"] == "model.layers.0.mlp"
    with pytest.raises(BundleError):
        save_certified(model, tmp_path / "out", certificate=cert)


def test_certify_cli_bad_input_raises(model_dir, tmp_path):
    with pytest.raises(PolicyError):
        certify_cli(str(model_dir), str(tmp_path / "missing.yaml"), None, str(tmp_path / "out"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with pytest.raises(dg.ModelError):
        certify_cli(str(tmp_path / "no-model"), str(policy), None, str(tmp_path / "out"))


def test_global_positions_are_reported_as_a_measured_finding():
    model = guarded(POLICY.replace("positions: per_domain", "positions: global"))
    cert = build_certificate(model, trials=6, generate_tokens=0)
    codes = {f.code: f for f in cert.findings}
    assert "DGF51" in codes and codes["DGF51"].severity == "warning"
    assert codes["DGF51"].details["changed"] is True
    assert cert.leak_test["position_channel"]["positions"] == "global"
    assert cert.verdict == "PROVED"  # a finding, not a refutation: the length channel is outside the claims
