"""SARIF 2.1.0 for refuted and unproved claims, at the policy lines the parser recorded."""

from __future__ import annotations

import json

import jsonschema
import pytest

from domainguard import report, sarif
from test_report_fixtures import PROVED_POLICY, REFUTED_POLICY, compile_dir, edit_certificate, forge_proved

# The parts of the SARIF 2.1.0 schema (OASIS, sarif-schema-2.1.0.json) that our logs use, with the same
# required properties and enumerations, plus what GitHub code scanning needs of each result.
_LOCATION = {
    "type": "object", "required": ["physicalLocation"],
    "properties": {"physicalLocation": {
        "type": "object", "required": ["artifactLocation", "region"],
        "properties": {
            "artifactLocation": {"type": "object", "required": ["uri"],
                                 "properties": {"uri": {"type": "string", "minLength": 1},
                                                "uriBaseId": {"type": "string"}}},
            "region": {"type": "object", "required": ["startLine"],
                       "properties": {"startLine": {"type": "integer", "minimum": 1},
                                      "startColumn": {"type": "integer", "minimum": 1}}}}},
        "message": {"$ref": "#/$defs/message"}},
}
SARIF_SUBSET = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["version", "runs"],
    "properties": {
        "version": {"const": "2.1.0"}, "$schema": {"type": "string", "format": "uri"},
        "runs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["tool"],
            "properties": {
                "tool": {"type": "object", "required": ["driver"], "properties": {"driver": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "rules": {"type": "array", "items": {
                                       "type": "object", "required": ["id"],
                                       "properties": {"id": {"type": "string"},
                                                      "shortDescription": {"$ref": "#/$defs/message"},
                                                      "fullDescription": {"$ref": "#/$defs/message"},
                                                      "defaultConfiguration": {"type": "object", "properties": {
                                                          "level": {"$ref": "#/$defs/level"}}}}}}}}}},
                "columnKind": {"enum": ["utf16CodeUnits", "unicodeCodePoints"]},
                "automationDetails": {"type": "object", "properties": {"id": {"type": "string"}}},
                "results": {"type": "array", "items": {
                    "type": "object", "required": ["message", "ruleId", "locations"],
                    "properties": {
                        "ruleId": {"type": "string"}, "ruleIndex": {"type": "integer", "minimum": -1},
                        "level": {"$ref": "#/$defs/level"},
                        "kind": {"enum": ["notApplicable", "pass", "fail", "review", "open", "informational"]},
                        "message": {"$ref": "#/$defs/message"},
                        "locations": {"type": "array", "minItems": 1, "items": _LOCATION},
                        "partialFingerprints": {"type": "object", "additionalProperties": {"type": "string"}},
                        "codeFlows": {"type": "array", "items": {
                            "type": "object", "required": ["threadFlows"],
                            "properties": {"threadFlows": {"type": "array", "minItems": 1, "items": {
                                "type": "object", "required": ["locations"],
                                "properties": {"locations": {"type": "array", "minItems": 1, "items": {
                                    "type": "object",
                                    "properties": {"location": _LOCATION,
                                                   "executionOrder": {"type": "integer", "minimum": -1}}}}}}}}}},
                    }}},
            }}},
    },
    "$defs": {
        "message": {"type": "object", "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
                    "properties": {"text": {"type": "string"}}},
        "level": {"enum": ["none", "note", "warning", "error"]},
    },
}


def _check(log: dict) -> None:
    jsonschema.validate(log, SARIF_SUBSET, cls=jsonschema.Draft202012Validator)
    run = log["runs"][0]
    for r in run["results"]:
        assert run["tool"]["driver"]["rules"][r["ruleIndex"]]["id"] == r["ruleId"]


def test_refuted_rules_are_errors_at_their_policy_lines(tmp_path):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="leaky")
    log = json.loads(report.render(d, "sarif"))
    _check(log)
    errors = [r for r in log["runs"][0]["results"] if r["level"] == "error"]
    assert [r["properties"]["claimId"] for r in errors] == ["forbid[0]", "forbid[1]"]
    lines = (tmp_path / "leaky.yaml").read_text().splitlines()
    for r, rule in zip(errors, ("flow: {from: toxicology, to: answer}", "combine: [instructions, toxicology]")):
        region = r["locations"][0]["physicalLocation"]["region"]
        assert lines[region["startLine"] - 1][region["startColumn"] - 1:].startswith("- " + rule) or \
            lines[region["startLine"] - 1].strip() == "- " + rule
        assert r["kind"] == "fail" and "REFUTED" in r["message"]["text"]
    flow = errors[0]
    assert "toxicology@0 → summary@1 → answer@2" in flow["message"]["text"]
    steps = flow["codeFlows"][0]["threadFlows"][0]["locations"]
    assert [s["location"]["message"]["text"] for s in steps] == [
        "information starts in toxicology@0", "attended by summary@1", "attended by answer@2"]
    assert len(errors[1]["codeFlows"]) == 2  # combine: one path from each side
    # The finding about global positions comes along as a warning.
    assert any(r["ruleId"] == "DGF01" and r["level"] == "warning" for r in log["runs"][0]["results"])
    assert log["runs"][0]["properties"]["verdict"] == "REFUTED"


def test_paths_are_relative_to_the_source_root(tmp_path):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="leaky")
    cert = json.loads((d / "certificate.json").read_text())
    rooted = sarif.to_sarif(cert, srcroot=str(tmp_path))
    art = rooted["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art == {"uri": "leaky.yaml", "uriBaseId": "%SRCROOT%"}
    bare = sarif.to_sarif(cert, srcroot="/elsewhere")
    art = bare["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art["uri"].startswith("file:///") and art["uri"].endswith("/leaky.yaml")


def test_proved_policy_has_no_errors(tmp_path):
    d = compile_dir(tmp_path, PROVED_POLICY, name="fine")
    log = json.loads(report.render(d, "sarif"))
    _check(log)
    assert [r for r in log["runs"][0]["results"] if r["level"] == "error"] == []
    props = log["runs"][0]["properties"]
    assert props["verdict"] == "PROVED" and props["claims"]["PROVED"] == 5  # 3 policy claims, 2 tile-table proofs


def test_unknown_claims_are_failing_warnings_never_silent(tmp_path):
    d = compile_dir(tmp_path, PROVED_POLICY, name="slow")

    def timeout(cert):
        cert["claims"][1].update(status="UNKNOWN", reason="z3: timeout")
        cert["verdict"] = "UNKNOWN"

    edit_certificate(d, timeout)
    log = json.loads(report.render(d, "sarif"))
    _check(log)
    (r,) = [r for r in log["runs"][0]["results"] if r["properties"].get("claimId") == "forbid[1]"]
    # (SARIF 2.1.0 §3.27.9: a kind other than "fail" must have level "none"; UNKNOWN is no pass)
    assert r["level"] == "warning" and r["kind"] == "fail" and "z3: timeout" in r["message"]["text"]


def test_profile_widening_is_reported_at_the_profile(tmp_path):
    text = PROVED_POLICY.replace("public: {reads: {answer: [instructions, medicine]}}",
                                 "public: {reads: {answer: [instructions, medicine, toxicology]}}")
    d = compile_dir(tmp_path, text, name="widen")
    log = json.loads(report.render(d, "sarif"))
    _check(log)
    (r,) = [r for r in log["runs"][0]["results"] if r["ruleId"] == "profile-widens"]
    line = r["locations"][0]["physicalLocation"]["region"]["startLine"]
    assert (tmp_path / "widen.yaml").read_text().splitlines()[line - 1].strip().startswith("public:")


def test_fingerprints_are_stable_and_distinct(tmp_path):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="leaky")
    a = json.loads(report.render(d, "sarif"))["runs"][0]["results"]
    b = json.loads(report.render(d, "sarif"))["runs"][0]["results"]
    fa = [r["partialFingerprints"]["domainguardClaim/v1"] for r in a]
    assert fa == [r["partialFingerprints"]["domainguardClaim/v1"] for r in b] and len(set(fa)) == len(fa)


@pytest.mark.parametrize("file, uri", [("<string>", "policy.yaml"), ("dir/p.yaml", "dir/p.yaml"),
                                       ("C:\\pol\\p.yaml", "file:///C:/pol/p.yaml"), ("a b.yaml", "a%20b.yaml")])
def test_uri_forms(file, uri):
    cert = {"verdict": "REFUTED", "claims": [{"id": "x", "kind": "flow", "statement": "s", "status": "REFUTED",
                                              "details": {"location": {"file": file, "line": 3, "column": 5}}}]}
    log = sarif.to_sarif(cert)
    _check(log)
    assert log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == uri


def test_run_verdict_is_never_stronger_than_the_claims():
    claims = [{"id": "a", "kind": "flow", "statement": "s", "status": "PROVED"},
              {"id": "b", "kind": "flow", "statement": "t", "status": "UNKNOWN", "reason": "z3: timeout"}]
    props = sarif.to_sarif({"verdict": "PROVED", "claims": claims})["runs"][0]["properties"]
    assert props["verdict"] == "UNKNOWN" and props["certificateVerdict"] == "PROVED"
    assert sarif.to_sarif({"verdict": "PROVED", "claims": []})["runs"][0]["properties"]["verdict"] == "UNKNOWN"


def test_a_tampered_directory_is_not_proved_in_sarif_either(tmp_path):
    """SARIF used to render the certificate as written: a policy edited after signing, or claims forged to
    PROVED, read PROVED there while every other format showed REFUTED."""
    d = compile_dir(tmp_path, REFUTED_POLICY, name="forged")

    edit_certificate(d, forge_proved)
    log = json.loads(report.render(d, "sarif"))
    _check(log)
    run = log["runs"][0]
    assert run["properties"]["verdict"] == "REFUTED" and run["properties"]["certificateVerdict"] == "PROVED"
    (top,) = [r for r in run["results"] if r["ruleId"] == "DGR01"]
    assert top["level"] == "error" and top["kind"] == "fail" and "REFUTED" in top["message"]["text"]
