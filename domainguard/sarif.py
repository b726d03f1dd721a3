"""SARIF 2.1.0 for code-scanning views: refuted rules (errors) and unproved claims (warnings) at their policy lines.

One result per claim that is not PROVED, located at the claim's ``details.location``
(the policy file, line and column the parser recorded), with the witness path as a
code flow; certificate findings become notes or warnings. PROVED claims are not
results: code-scanning views list problems, and a claim proved is none. The run's
properties carry the overall verdict and the claim counts so nothing is hidden.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath, PureWindowsPath
from urllib.parse import quote

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

_RULES = {
    "flow": ("forbid-flow", "Forbidden information flow",
             "A `forbid: flow` rule of the policy: no information path of any length from one domain to another."),
    "isolate": ("forbid-isolate", "Forbidden information flow in either direction",
                "A `forbid: isolate` rule: no information path between two domains, in either direction."),
    "combine": ("forbid-combine", "Forbidden combination of domains",
                "A `forbid: combine` rule: no hidden state may depend on both domains."),
    "profile-refines": ("profile-widens", "Deployment profile widens the policy",
                        "A deployment profile may only tighten the base policy; this one lets a reader attend a "
                        "source the base policy forbids."),
}


def _rule_for(kind: str) -> tuple[str, str, str]:
    if kind in _RULES:
        return _RULES[kind]
    return (f"claim-{kind}", f"Claim of kind {kind}", f"A certificate claim of kind `{kind}` that was not proved.")


def _uri(file: str, srcroot: str | None) -> tuple[str, str | None]:
    """An artifact URI: relative paths (and absolute ones under ``srcroot``) relative to %SRCROOT%, others file://."""
    if file.startswith("<") or not file:
        return "policy.yaml", "%SRCROOT%"
    if PureWindowsPath(file).drive:
        return "file:///" + quote(PureWindowsPath(file).as_posix(), safe="/:"), None
    p = PurePosixPath(file.replace("\\", "/"))
    if p.is_absolute() and srcroot:
        try:
            p = p.relative_to(PurePosixPath(srcroot))
        except ValueError:
            pass
    if p.is_absolute():
        return "file://" + quote(p.as_posix()), None
    return quote(p.as_posix()), "%SRCROOT%"


def _physical(loc: dict | None, fallback: str, srcroot: str | None = None) -> dict:
    loc = loc or {}
    uri, base = _uri(str(loc.get("file") or fallback), srcroot)
    artifact = {"uri": uri}
    if base:
        artifact["uriBaseId"] = base
    region = {"startLine": max(1, int(loc.get("line") or 1))}
    if loc.get("column"):
        region["startColumn"] = max(1, int(loc["column"]))
    return {"physicalLocation": {"artifactLocation": artifact, "region": region}}


def _witness_paths(claim: dict) -> list[dict]:
    out = []
    for w in claim.get("witness") or []:
        if isinstance(w, dict) and isinstance(w.get("steps"), list):
            out.append(w)
        elif isinstance(w, str):
            out.append({"text": w, "steps": []})
    return out


def _code_flow(path: dict, location: dict) -> dict:
    steps = path.get("steps") or []
    tfl = []
    for i, st in enumerate(steps):
        via = st.get("via", "")
        how = {"origin": "information starts in", "attention": "attended by", "decode": "fed back by decoding into"}
        text = f"{how.get(via, via)} {st.get('domain')}@{st.get('level')}"
        tfl.append({"location": {**location, "message": {"text": text}}, "executionOrder": i + 1})
    if not tfl:
        tfl.append({"location": {**location, "message": {"text": str(path.get("text", ""))}}})
    return {"message": {"text": f"witness: {path.get('text', '')}"}, "threadFlows": [{"locations": tfl}]}


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _verdict(cert_verdict, claims: list) -> str:
    """The certificate's verdict or, where its claims say less, theirs: PROVED only when both say so (and there
    is a claim at all, as in the report)."""
    from .verdict import Status, combine_status

    if not claims:
        return "UNKNOWN"

    def st(x):
        return Status(x) if x in ("PROVED", "REFUTED", "UNKNOWN") else Status.UNKNOWN

    return combine_status([st(cert_verdict)] + [st(c.get("status")) for c in claims]).value


def to_sarif(cert: dict, *, policy_file: str | None = None, srcroot: str | None = None,
             shown: dict | None = None) -> dict:
    """A SARIF 2.1.0 log for one certificate (a dict in the certificate's JSON shape).

    Policy paths are made relative to ``srcroot`` (e.g. the repository root) when they are absolute and under it.
    ``shown``: the report's re-checked verdict (``report.build(...)["verdict"]``); where it is not PROVED the log
    carries it as a failing result and as its verdict, whatever the certificate says.
    """
    subject = cert.get("subject") or {}
    policy = subject.get("policy") or {}
    fallback = policy_file or policy.get("file") or policy.get("path") or "policy.yaml"
    tools = cert.get("tools") or {}
    rules: list[dict] = []
    rule_index: dict[str, int] = {}
    results: list[dict] = []
    counts = {"PROVED": 0, "REFUTED": 0, "UNKNOWN": 0}

    def rule(rid: str, name: str, text: str, level: str) -> int:
        if rid not in rule_index:
            rule_index[rid] = len(rules)
            rules.append({"id": rid, "name": "".join(w.capitalize() for w in name.split()),
                          "shortDescription": {"text": name}, "fullDescription": {"text": text},
                          "defaultConfiguration": {"level": level},
                          "properties": {"tags": ["security", "information-flow"]}})
        return rule_index[rid]

    for claim in cert.get("claims") or []:
        status = str(claim.get("status", "UNKNOWN"))
        counts[status if status in counts else "UNKNOWN"] += 1
        if status == "PROVED":
            continue
        rid, name, text = _rule_for(str(claim.get("kind", "claim")))
        refuted = status == "REFUTED"
        idx = rule(rid, name, text, "error")
        details = claim.get("details") or {}
        location = _physical(details.get("location"), fallback, srcroot)
        paths = _witness_paths(claim)
        if refuted:
            msg = f"{claim.get('id')}: REFUTED — {claim.get('statement')}"
            if paths:
                msg += ". Witness: " + "; ".join(str(p.get("text", "")) for p in paths)
            expl = details.get("explanation") or {}
            if expl.get("text"):
                msg += f". Fix: {expl['text']}"
        else:
            msg = (f"{claim.get('id')}: not proved (UNKNOWN) — {claim.get('statement')}. "
                   f"Reason: {claim.get('reason') or 'none given'}")
        if claim.get("reason") and refuted:
            msg += f" ({claim['reason']})"
        result = {
            "ruleId": rid,
            "ruleIndex": idx,
            "level": "error" if refuted else "warning",
            "kind": "fail",  # UNKNOWN is not a pass either (SARIF: a kind other than fail needs level none)
            "message": {"text": msg},
            "locations": [location],
            "partialFingerprints": {"domainguardClaim/v1": _fingerprint(str(claim.get("id")), str(claim.get("statement")))},
            "properties": {"claimId": claim.get("id"), "status": status,
                           "method": claim.get("method"), "scope": claim.get("scope")},
        }
        if paths:
            result["codeFlows"] = [_code_flow(p, location) for p in paths]
        results.append(result)

    for f in cert.get("findings") or []:
        sev = str(f.get("severity", "warning"))
        level = {"error": "error", "warning": "warning"}.get(sev, "note")
        code = str(f.get("code", "finding"))
        idx = rule(code, f"Finding {code}", str(f.get("message", "")), level)
        details = f.get("details") or {}
        results.append({
            "ruleId": code, "ruleIndex": idx, "level": level if level != "note" else "none",
            "kind": "fail" if level != "note" else "informational",
            "message": {"text": str(f.get("message", ""))},
            "locations": [_physical(details.get("location"), fallback, srcroot)],
            "partialFingerprints": {"domainguardClaim/v1": _fingerprint(code, str(f.get("message", "")))},
        })

    verdict = _verdict(cert.get("verdict"), cert.get("claims") or [])
    if shown is not None and shown.get("shown") and shown.get("shown") not in ("PROVED", verdict):
        verdict = str(shown["shown"])
        idx = rule("DGR01", "Re-checked verdict",
                   "What re-checking the directory (files, signature, policy, claims) gives, when it is not PROVED.",
                   "error")
        results.insert(0, {
            "ruleId": "DGR01", "ruleIndex": idx, "level": "error" if verdict == "REFUTED" else "warning",
            "kind": "fail",
            "message": {"text": f"Re-checked verdict {verdict} (the certificate says {cert.get('verdict')}): "
                                + "; ".join(str(r) for r in shown.get("reasons") or []) or "no reason recorded"},
            "locations": [_physical(None, fallback, srcroot)],
            "partialFingerprints": {"domainguardClaim/v1": _fingerprint("DGR01", verdict)},
            "properties": {"claimId": None, "status": verdict, "certificateVerdict": cert.get("verdict")},
        })

    driver = {"name": "domainguard", "rules": rules}
    if tools.get("domainguard"):
        driver["version"] = str(tools["domainguard"])
        driver["semanticVersion"] = str(tools["domainguard"])
    scope = cert.get("scope") or {}
    run = {
        "tool": {"driver": driver},
        "automationDetails": {"id": f"domainguard/{policy.get('name', 'policy')}/{scope.get('profile') or 'base'}/"},
        "columnKind": "unicodeCodePoints",
        "originalUriBaseIds": {"%SRCROOT%": {"description": {"text": "The directory the policy path is relative to."}}},
        "results": results,
        "properties": {"verdict": verdict,
                       "certificateVerdict": cert.get("verdict"), "claims": counts,
                       "policy": {"name": policy.get("name"), "sha256": policy.get("sha256")}},
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def dumps(cert: dict, **kw) -> str:
    """``to_sarif`` as indented JSON text."""
    return json.dumps(to_sarif(cert, **kw), indent=2, ensure_ascii=False) + "\n"
