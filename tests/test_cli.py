"""Golden CLI tests over policies/: verdicts, witnesses, exit codes, --json, atomic compile, tampered directories."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from domainguard.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = sorted((ROOT / "policies").glob("*.yaml"))
BAD = sorted((ROOT / "policies" / "violating").glob("*.yaml"))


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_there_are_enough_golden_policies():
    assert len(GOOD) >= 5 and len(BAD) >= 5


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_compliant_policies_prove(path, capsys):
    code, out, _ = run(capsys, "verify", str(path), "--json")
    data = json.loads(out)
    assert code == 0 and data["status"] == "PROVED", data


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_violating_policies_refute_with_expected_witness(path, capsys):
    expect = re.search(r"^# expect: (\w+) (\S+) (.+)$", path.read_text(), re.M)
    assert expect, f"{path} needs an '# expect:' header"
    status, claim_id, witness = expect.groups()
    code, out, _ = run(capsys, "verify", str(path), "--json")
    data = json.loads(out)
    assert code == 1 and data["status"] == status
    claim = next(c for c in data["claims"] if c["id"] == claim_id)
    assert claim["status"] == status
    texts = [w["text"] for w in claim.get("witness", [])]
    if claim["kind"] == "profile-refines":
        assert witness in claim["reason"]
    else:
        assert witness in texts, texts
        assert claim["details"]["location"]["line"] > 0


def test_text_output_shows_witness_and_exit_code(capsys):
    code, out, _ = run(capsys, "verify", str(ROOT / "policies/violating/two_hop.yaml"), "--layers", "4")
    assert code == 1
    assert "toxicology@0 → summary@1 → answer@2" in out and "REFUTED" in out


def test_bad_input_exit_2_and_nothing_written(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("domainguard: 1\nname: x\ndomains:\n  a: {}\nreads:\n  a: [ghost]\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "compile", str(bad), "-o", str(out_dir), "--json")
    assert code == 2
    data = json.loads(out)
    assert data["code"] == "DG105" and data["line"] == 6 and data["column"] == 7
    assert f"{bad}:6:7" in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == [bad]


def test_widening_profile_is_refused_by_compile(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "compile", str(ROOT / "policies/violating/widening_profile.yaml"),
                       "--profile", "partner", "-o", str(out_dir))
    assert code == 1 and not out_dir.exists()
    assert "answer ← internal" in err


def test_compile_then_verify_directory_and_detect_tampering(tmp_path, capsys):
    out_dir = tmp_path / "clinical"
    code, out, _ = run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "12", "-o", str(out_dir), "--json")
    assert code == 0, out
    assert {p.name for p in out_dir.iterdir()} == {"policy.yaml", "policy.json", "domains.json", "relations.npy",
                                                   "certificate.json"}
    cert = json.loads((out_dir / "certificate.json").read_text())
    assert cert["verdict"] == "PROVED" and cert["tools"]["z3"]
    assert {c["id"] for c in cert["claims"]} == {"forbid[0]", "forbid[1]", "profile[public]"}
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["status"] == "PROVED"

    # A widened table with the digest left alone: never PROVED.
    bad = tmp_path / "tampered"
    shutil.copytree(out_dir, bad)
    rel = np.load(bad / "relations.npy")
    rel[:, -1, :] = True  # answer reads everything
    np.save(bad / "relations.npy", rel)
    code, out, _ = run(capsys, "verify", str(bad), "--json")
    data = json.loads(out)
    assert code == 1 and data["status"] == "REFUTED"
    art = next(c for c in data["claims"] if c["id"] == "artifact")
    assert "relations.npy" in art["reason"]

    # The policy edited to leak: the re-derived proof refutes it.
    leak = tmp_path / "leak"
    shutil.copytree(out_dir, leak)
    text = (leak / "policy.yaml").read_text().replace("answer: [instructions, records, medicine]",
                                                      "answer: [instructions, records, medicine, toxicology]")
    (leak / "policy.yaml").write_text(text)
    code, out, _ = run(capsys, "verify", str(leak), "--json")
    assert code == 1 and json.loads(out)["status"] == "REFUTED"


def test_explain_and_schema(capsys):
    code, out, _ = run(capsys, "explain", str(ROOT / "policies/violating/two_hop.yaml"),
                       "--from", "toxicology", "--to", "answer", "--layers", "4", "--json")
    data = json.loads(out)
    assert code == 1 and data["flows"] and data["details"]["explanation"]["drop_one_of"]
    code, out, _ = run(capsys, "explain", str(ROOT / "policies/clinical.yaml"), "--from", "toxicology", "--to", "answer")
    assert code == 0 and "no information path" in out
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out)["title"] == "domainguard policy"


def test_usage_error_is_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["verify"]) == 2
