"""A real certified bundle (tiny Llama): signed, reported on, verified offline, and refused when touched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import domainguard as dg
from domainguard import cli, report, signing
from domainguard.errors import BundleError

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
    f = path / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        signing.verify_bundle_signature(path, pub)
    assert e.value.location.file == str(f)


def test_sarif_of_a_proved_bundle_has_no_errors(signed):
    log = json.loads(report.render(signed[0], "sarif"))
    assert [r for r in log["runs"][0]["results"] if r["level"] == "error"] == []
    assert log["runs"][0]["properties"]["verdict"] == "PROVED"
