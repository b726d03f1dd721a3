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


def test_a_directory_without_a_certificate_says_what_to_give(tmp_path, capsys):
    code, out, err = run(capsys, "verify", str(tmp_path), "--json")
    assert code == 2 and "Traceback" not in err
    e = json.loads(out)
    assert e["code"] == "DG401" and "certificate.json" in e["message"]
    assert "domainguard compile -o" in e["hint"]


def test_unwritable_output_is_exit_2_with_a_json_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "4",
                         "-o", str(tmp_path / "afile" / "sub"), "--json")
    assert code == 2 and "Traceback" not in err
    e = json.loads(out)
    assert e["code"] == "DG440" and "afile" in e["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_empty_table_file_is_named_not_a_silent_exit(tmp_path, capsys):
    out_dir = tmp_path / "c"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "4", "-o", str(out_dir))[0] == 0
    (out_dir / "relations.npy").write_bytes(b"")
    code, out, err = run(capsys, "verify", str(out_dir))
    text = " ".join((out + err).split())  # the console wraps long lines
    assert code == 1 and "relations.npy: unreadable" in text and "verdict: REFUTED" in text


def test_malformed_certificate_subject_is_dg402_not_a_traceback(tmp_path, capsys):
    out_dir = tmp_path / "c"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "4", "-o", str(out_dir))[0] == 0
    cert = json.loads((out_dir / "certificate.json").read_text())
    cert["subject"]["files"] = [1, 2]
    (out_dir / "certificate.json").write_text(json.dumps(cert))
    for cmd in (("verify", str(out_dir), "--json"), ("report", str(out_dir), "--format", "json")):
        code, out, err = run(capsys, *cmd)
        assert code == 2 and "DG402" in out + err and "subject.files" in out + err, cmd


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
    assert {c["id"] for c in cert["claims"]} == {"forbid[0]", "forbid[1]", "profile[public]",
                                                  "patterns-within-policy", "tile-rules-sound"}
    assert len(cert["subject"]["kernels"]["sha256"]) == 64 and "forward.py" in cert["subject"]["kernels"]["files"]
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")
    data = json.loads(out)
    assert code == 0 and data["status"] == "PROVED"
    assert {c["id"]: c["status"] for c in data["claims"]}["kernels"] == "PROVED"

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


def test_kernels_other_than_the_certified_ones_are_never_proved(tmp_path, capsys):
    out_dir = tmp_path / "clinical"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "4", "-o", str(out_dir))[0] == 0
    cert = json.loads((out_dir / "certificate.json").read_text())
    cert["subject"]["kernels"]["sha256"] = "0" * 64
    (out_dir / "certificate.json").write_text(json.dumps(cert))
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")
    kernels = next(c for c in json.loads(out)["claims"] if c["id"] == "kernels")
    assert code == 3 and kernels["status"] == "UNKNOWN" and "differs from the certified" in kernels["reason"]


def test_canonical_policy_alone_recompiles_to_the_same_tables(tmp_path, capsys):
    """policy.json keeps the domain tree's order, so it compiles to the same ids and tables as the YAML."""
    out_dir = tmp_path / "clinical"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "6", "-o", str(out_dir))[0] == 0
    (out_dir / "policy.yaml").unlink()
    cert = json.loads((out_dir / "certificate.json").read_text())
    del cert["subject"]["files"]["policy.yaml"]
    (out_dir / "certificate.json").write_text(json.dumps(cert))
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")
    assert code == 0, out
    # A domain tree written in another order is another policy: other ids, other digest.
    text = (ROOT / "policies/clinical.yaml").read_text()
    swapped = text.replace("  records: {description: Patient records}\n", "", 1).replace(
        "  toxicology: {description", "  records: {description: Patient records}\n  toxicology: {description", 1)
    assert swapped != text
    from domainguard import compile, load_policy

    a = compile(load_policy(ROOT / "policies/clinical.yaml"), layers=6)
    p = tmp_path / "swapped.yaml"
    p.write_text(swapped)
    b = compile(load_policy(p), layers=6)
    assert a.domains != b.domains and a.policy_digest != b.policy_digest


@pytest.mark.parametrize("edit", [
    lambda c: c.update(assumptions=["Nothing is assumed."]),
    lambda c: c["threat_model"].update(not_covered=[]),
    lambda c: c["claims"][0].update(statement="no path from anything to anywhere"),
], ids=["assumptions", "threat-model", "statement"])
def test_an_unsigned_certificates_words_are_checked_too(tmp_path, capsys, edit):
    """Nothing digests an unsigned directory's certificate: its assumptions, threat model and claim statements
    were printed to a report's reader as written, and verify said PROVED."""
    from domainguard import report

    out_dir = tmp_path / "c"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "-o", str(out_dir))[0] == 0
    cert = json.loads((out_dir / "certificate.json").read_text())
    edit(cert)
    (out_dir / "certificate.json").write_text(json.dumps(cert))
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")
    assert code == 1 and {c["id"]: c["status"] for c in json.loads(out)["claims"]}["certificate"] == "REFUTED"
    shown = report.build(out_dir)["verdict"]
    assert shown["shown"] != "PROVED" and any("words were changed" in r for r in shown["reasons"])


def test_signed_compiled_directory(tmp_path, capsys):
    key = tmp_path / "k.pem"
    assert run(capsys, "keygen", str(key))[0] == 0
    assert (tmp_path / "k.pem.pub").is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
    code, _, err = run(capsys, "keygen", str(key))
    assert code == 2 and "DG419" in err  # never overwrites a key
    other = tmp_path / "other.pem"
    assert run(capsys, "keygen", str(other), str(tmp_path / "other.pub"))[0] == 0

    out_dir = tmp_path / "signed"
    code, out, _ = run(capsys, "compile", str(ROOT / "policies/prompt_injection.yaml"), "--layers", "4",
                       "-o", str(out_dir), "--key", str(key))
    assert code == 0 and (out_dir / "signature.json").is_file(), out
    code, out, _ = run(capsys, "verify", str(out_dir), "--pubkey", str(tmp_path / "k.pem.pub"), "--json")
    sig = next(c for c in json.loads(out)["claims"] if c["id"] == "signature")
    assert code == 0 and sig["scope"]["authenticated"] is True
    code, out, _ = run(capsys, "verify", str(out_dir), "--json")  # no key: integrity only, said so
    sig = next(c for c in json.loads(out)["claims"] if c["id"] == "signature")
    assert code == 0 and sig["scope"]["authenticated"] is False and "not authorship" in sig["statement"]
    code, _, err = run(capsys, "verify", str(out_dir), "--pubkey", str(tmp_path / "other.pub"))
    assert code == 2 and "DG41" in err

    # One byte changed in any file: refused, naming it (with or without the key).
    for name in ("policy.yaml", "relations.npy", "certificate.json", "domains.json"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(out_dir, bad)
        data = bytearray((bad / name).read_bytes())
        data[len(data) // 2] ^= 1
        (bad / name).write_bytes(bytes(data))
        code, _, err = run(capsys, "verify", str(bad))
        assert code == 2 and name in err, (name, err)

    # A bad key is refused before anything is written.
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    code, _, err = run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "-o", str(tmp_path / "never"),
                       "--key", str(junk))
    assert code == 2 and not (tmp_path / "never").exists()


def test_random_link_seeds_are_in_the_certificate(tmp_path, capsys):
    policy = tmp_path / "rnd.yaml"
    policy.write_text("""domainguard: 1
name: random-links
domains: {a: {}, b: {}, answer: {}}
reads: {answer: [a]}
forbid:
  - flow: {from: b, to: answer}
patterns:
  default: {causal: true}
  answer: {causal: true, window: 64, random: {links: 2, seed: 7}}
generation: {domain: answer}
positions: reach
""")
    out_dir = tmp_path / "rnd"
    assert run(capsys, "compile", str(policy), "--layers", "2", "-o", str(out_dir))[0] == 0
    cert = json.loads((out_dir / "certificate.json").read_text())
    assert cert["scope"]["random_links"] == [{"at": "policy.patterns.answer", "links": 2, "seed": 7}]
    assert not any(f["code"] == "DGF01" for f in cert.get("findings", []))  # reach positions: no length channel
    # Another seed is another policy: other digest.
    policy.write_text(policy.read_text().replace("seed: 7", "seed: 8"))
    assert run(capsys, "compile", str(policy), "--layers", "2", "-o", str(tmp_path / "rnd8"))[0] == 0
    other = json.loads((tmp_path / "rnd8" / "certificate.json").read_text())
    assert other["subject"]["policy"]["sha256"] != cert["subject"]["policy"]["sha256"]


def test_report_format_follows_the_output_suffix(tmp_path, capsys):
    out_dir = tmp_path / "clinical"
    assert run(capsys, "compile", str(ROOT / "policies/clinical.yaml"), "--layers", "4", "-o", str(out_dir))[0] == 0
    assert run(capsys, "report", str(out_dir), "-o", str(tmp_path / "r.json"))[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())
    assert run(capsys, "report", str(out_dir), "-o", str(tmp_path / "r.md"))[0] == 0
    assert (tmp_path / "r.md").read_text().startswith("#")
    code, out, _ = run(capsys, "report", str(out_dir), "--format", "sarif")
    assert code == 0 and json.loads(out)["version"] == "2.1.0"


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


# --- found by a review as a new user -----------------------------------------------------------------
SMALL = """domainguard: 1
name: small
domains: {a: {}, b: {}, c: {}}
reads: {b: [a], c: [b]}
forbid: [{flow: {from: a, to: c}}]
"""


def test_compile_never_replaces_a_folder_that_holds_other_files(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "certificate.json").write_text("{}")  # someone else's certificate.json
    (out / "model.safetensors").write_text("weights")
    code, _, err = run(capsys, "compile", str(policy), "-o", str(out))
    assert code == 2 and "DG451" in err and (out / "model.safetensors").read_text() == "weights"
    # A compiled directory is replaced ... unless a file was added to it since.
    fresh = tmp_path / "fresh"
    assert run(capsys, "compile", str(policy), "-o", str(fresh))[0] == 1
    assert run(capsys, "compile", str(policy), "-o", str(fresh))[0] == 1
    (fresh / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "compile", str(policy), "-o", str(fresh))
    assert code == 2 and "notes.txt" in err and (fresh / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("rng", ["2-", "5-", "1-9"])
def test_a_pattern_layer_range_outside_the_model_is_a_located_error(tmp_path, capsys, rng):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL + f"patterns:\n  b: [{{window: 4, layers: \"{rng}\"}}]\n")
    for cmd in (["compile", str(policy), "--layers", "2", "-o", str(tmp_path / "o")],
                ["verify", str(policy), "--layers", "2", "--json"]):
        code, out, err = run(capsys, *cmd)
        assert code == 2 and "DG107" in out + err and "Traceback" not in err
        assert f"{policy}:7:" in out + err or '"line": 7' in out
    assert not (tmp_path / "o").exists()


def test_layers_that_contradict_the_policys_num_layers_are_refused(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL.replace("name: small\n", "name: small\nnum_layers: 30\n"))
    assert run(capsys, "verify", str(policy))[0] == 1  # REFUTED at 30 layers
    code, _, err = run(capsys, "verify", str(policy), "--layers", "1")
    assert code == 2 and "DG107" in err and "num_layers: 30" in err
    assert run(capsys, "verify", str(policy), "--layers", "30")[0] == 1


def test_errors_keep_file_line_and_column_on_one_line(tmp_path, capsys):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "and-another-long-one"
    deep.mkdir(parents=True)
    policy = deep / "policy_with_a_long_name.yaml"
    policy.write_text("domainguard: 1\nname: x\ndomains: {a: {}}\nreads: {a: [nowhere]}\n")
    code, _, err = run(capsys, "verify", str(policy))
    assert code == 2 and f"{policy}:4:" in err.replace("\n", "\n") and any(
        line.startswith(f"{policy}:4:") for line in err.splitlines())


def test_too_many_domains_is_a_policy_error_not_an_exhausted_machine(tmp_path, capsys):
    policy = tmp_path / "big.yaml"
    policy.write_text("domainguard: 1\nname: big\ndomains:\n" + "".join(f"  d{i}: {{}}\n" for i in range(5000)))
    code, _, err = run(capsys, "verify", str(policy))
    assert code == 2 and "DG116" in err


def test_control_characters_in_the_policy_name_are_refused(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL.replace("name: small", 'name: "ok\\e[2K\\rverdict: PROVED\\e[8m"'))
    code, out, err = run(capsys, "verify", str(policy))
    assert code == 2 and "DG102" in err and "\x1b" not in out + err


@pytest.mark.parametrize("text, expect", [
    ("domainguard: 1\nname: x\ndomains: {on: {}, b: {}}\n", "boolean true"),
    ("domainguard: 1\nname: x\nbase: &s {a: {}}\ndomains:\n  <<: *s\n  b: {}\n", "merge keys"),
])
def test_yaml_features_get_an_error_that_says_what_they_are(tmp_path, capsys, text, expect):
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    code, _, err = run(capsys, "verify", str(policy))
    assert code == 2 and expect in err and f"{policy}:" in err


def test_verify_of_a_certificate_file_points_at_its_directory(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL.replace("forbid: [{flow: {from: a, to: c}}]", "forbid: [{flow: {from: c, to: a}}]"))
    assert run(capsys, "compile", str(policy), "-o", str(tmp_path / "d"))[0] == 0
    code, _, err = run(capsys, "verify", str(tmp_path / "d" / "certificate.json"))
    assert code == 2 and "DG404" in err and f"verify {tmp_path / 'd'}" in err


def test_a_folder_named_signature_json_does_not_hide_an_added_file(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(SMALL.replace("forbid: [{flow: {from: a, to: c}}]", "forbid: [{flow: {from: c, to: a}}]"))
    d = tmp_path / "d"
    assert run(capsys, "compile", str(policy), "-o", str(d))[0] == 0
    (d / "signature.json").mkdir()
    (d / "extra.txt").write_text("x")
    code, out, _ = run(capsys, "verify", str(d))
    assert code == 1 and "extra.txt" in out


def test_version_prints_the_package_version_and_exits_0(capsys):
    import importlib.metadata

    import domainguard

    code, out, err = run(capsys, "--version")
    assert code == 0 and out.strip() == f"domainguard {domainguard.__version__}", (out, err)
    # the installed distribution says the same (pyproject.toml and __init__ kept in step)
    assert importlib.metadata.version("domainguard") == domainguard.__version__
    # a command still runs after the root callback was added
    code, out, _ = run(capsys, "explain", str(ROOT / "policies" / "clinical.yaml"), "--from", "toxicology",
                       "--to", "answer")
    assert code == 0 and "no information path" in out
