"""Audit reports for regulators: HTML, PDF, Markdown, JSON and SARIF from one certificate.

The pipeline runs leaf to root, one stage a part of this file:

    load (compiled directory or bundle; certificate checked, digests re-computed,
          signature checked, policy re-compiled for the pictures and its claims re-derived)
      → report data  (one JSON-able dict, ``format: domainguard-report/1``; the single
                      source of every statement; ``--format json`` writes it as is)
      → document     (headings, paragraphs, tables and vector drawings)
      → HTML (inline SVG) | PDF (a small dependency-free writer) | Markdown.

The report never decides a verdict and never claims more than the certificate: it
shows the certificate's verdict *or something weaker* — UNKNOWN when a claim is
UNKNOWN, when there are no claims, when a digest or the signature does not check out,
or when the leak test measured leakage; REFUTED when re-deriving the policy's claims
refutes one — and says why. A re-derivation stronger than the certificate is noted,
never counted. No browser is needed at run time; output is deterministic (same
inputs, same bytes). The PDF uses the standard Type 1 fonts (WinAnsi): characters
outside Western European scripts are transliterated there; HTML and JSON keep them.
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import json
import math
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import BundleError, DomainGuardError, Location

REPORT_FORMAT = "domainguard-report/1"
FORMATS = ("html", "pdf", "md", "json", "sarif")
_SUFFIXES = {".html": "html", ".htm": "html", ".pdf": "pdf", ".md": "md", ".markdown": "md", ".json": "json",
             ".sarif": "sarif"}
STATUSES = ("PROVED", "REFUTED", "UNKNOWN")
FORBID_KINDS = ("flow", "isolate", "combine")

COLOR = {"PROVED": "#1a7f37", "REFUTED": "#cf222e", "UNKNOWN": "#9a6700"}
TINT = {"PROVED": "#dafbe1", "REFUTED": "#ffebe9", "UNKNOWN": "#fff8c5"}
INK, MUTED, GRID, ACCENT, WITNESS = "#1f2328", "#59636e", "#d1d9e0", "#0969da", "#cf222e"


# =============================================================================================
# 1. Loading: a compiled directory or bundle → _Source
# =============================================================================================
@dataclass
class _Source:
    root: Path
    cert_path: Path
    cert: dict
    compiled: Any = None  # CompiledPolicy re-compiled from the directory's policy, or None
    notes: list[str] = field(default_factory=list)  # why something could not be shown


def _load(path: str | Path) -> _Source:
    from .certificate import Certificate

    p = Path(path)
    if p.is_dir():
        root, cert_path = p, p / "certificate.json"
    elif p.is_file() and p.suffix == ".json":
        root, cert_path = p.parent, p
    else:
        raise BundleError("not a compiled directory, bundle or certificate.json", code="DG430",
                          location=Location(str(p)), hint="Pass the folder `domainguard compile -o` or `certify -o` wrote.")
    Certificate.load(cert_path)  # validates the shape; BundleError DG401/DG402 names the file
    try:
        cert = json.loads(cert_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # pragma: no cover - Certificate.load read it a moment ago
        raise BundleError(f"unreadable certificate ({exc})", code="DG431", location=Location(str(cert_path))) from None
    src = _Source(root=root, cert_path=cert_path, cert=cert)
    src.compiled = _recompile(src)
    return src


def _recompile(src: _Source):
    """The policy of the directory compiled at the certificate's scope, for pictures; None (with a note) if impossible."""
    from .compiled import compile
    from .parse import load_policy, loads_policy

    yaml_p, json_p = src.root / "policy.yaml", src.root / "policy.json"
    scope = src.cert.get("scope") or {}
    layers = scope.get("layers")
    try:
        if yaml_p.is_file():
            policy = load_policy(yaml_p)
        elif json_p.is_file():
            policy = loads_policy(json_p.read_text(encoding="utf-8"), str(json_p))
        else:
            src.notes.append("no policy.yaml or policy.json beside the certificate: domain pictures omitted")
            return None
        profile = scope.get("profile")
        return compile(policy, layers=layers if isinstance(layers, int) else None,
                       profile=profile if isinstance(profile, str) else None)
    except DomainGuardError as exc:
        src.notes.append(f"the directory's policy does not compile ({exc}): domain pictures omitted")
        return None


# =============================================================================================
# 2. Report data: _Source → dict (the JSON report)
# =============================================================================================
def _status(value) -> str:
    return value if value in STATUSES else "UNKNOWN"


def _combine(statuses: list[str]) -> str:
    """REFUTED beats UNKNOWN beats PROVED; nothing at all is UNKNOWN (``verdict.combine_status``)."""
    from .verdict import Status, combine_status

    return combine_status(Status(_status(s)) for s in statuses).value


def _ranges(items: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5"."""
    out, items = [], sorted(items)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(out)


def _integrity(src: _Source) -> dict:
    """Re-compute every digest the certificate lists that can be checked here, and check the signature."""
    from .bundle import _inside
    from .certificate import sha256_file
    from .signing import SIGNATURE_FILE, check_signature_integrity

    subject = src.cert.get("subject") or {}
    rows: list[dict] = []

    def add(item: str, expected: str | None, actual: str | None, status: str, note: str = "") -> None:
        rows.append({"item": item, "expected": expected, "actual": actual, "status": status, "note": note})

    def check(item: str, name: str, digest: str, absent: str) -> None:
        # Only regular files inside the directory are read: a certificate naming ../x or /etc/x would
        # otherwise have the report print the digest of a file of the reader's machine.
        if not _inside(name):
            return add(item, digest, None, "mismatch", "names a path outside the directory; not read")
        f = src.root / name
        if f.is_symlink() or (f.exists() and not f.is_file()):
            return add(item, digest, None, "mismatch", "a link or special file; not read")
        if not f.is_file():
            return add(item, digest, None, "missing", absent)
        actual = sha256_file(f)
        add(item, digest, actual, "match" if actual == digest else "mismatch")

    for name, digest in sorted((subject.get("files") or {}).items()):
        check(name, name, digest, "listed in the certificate, not present")
    kernels = subject.get("kernels")
    if isinstance(kernels, dict) and isinstance(kernels.get("sha256"), str):
        # The kernels are installed code, not files of the directory: compare with what would run here.
        try:
            from .artifact import kernel_subject

            actual = kernel_subject(src.compiled)["sha256"] if src.compiled is not None else None
        except (ImportError, DomainGuardError):
            actual = None
        if actual is None:
            add("kernels", kernels["sha256"], None, "not checked", "no kernels or policy to re-derive them from")
        else:
            add("kernels", kernels["sha256"], actual, "match" if actual == kernels["sha256"] else "mismatch",
                "the installed kernel source and the frozen tables built from the directory's policy")
    for key, entry in sorted(subject.items()):
        # Other subject parts (weights, ...) may name files of their own.
        if key in ("files", "policy", "tables", "kernels") or not isinstance(entry, dict):
            continue
        named = dict(entry.get("files") or {}) if isinstance(entry.get("files"), dict) else {}
        if isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
            named[entry["file"]] = entry["sha256"]
        for name, digest in sorted(named.items()):
            if isinstance(digest, str):
                check(f"{key}: {name}", str(name), digest, "named by the certificate, not present")
    comp = src.compiled
    pol = (subject.get("policy") or {}).get("sha256")
    tab = (subject.get("tables") or {}).get("sha256")
    if comp is not None:
        if pol:
            add("canonical policy", pol, comp.policy_digest, "match" if pol == comp.policy_digest else "mismatch",
                "re-derived from the directory's policy")
        if tab:
            add("relation tables", tab, comp.tables_digest, "match" if tab == comp.tables_digest else "mismatch",
                "re-compiled from the directory's policy at the certificate's scope")
    else:
        for label, d in (("canonical policy", pol), ("relation tables", tab)):
            if d:
                add(label, d, None, "not checked", "no policy to re-derive it from")

    sig_path = src.root / SIGNATURE_FILE
    if not sig_path.is_file():
        signature = {"status": "absent", "key_id": None,
                     "detail": "the directory is not signed; nothing shows who produced it or that it is unchanged"}
    else:
        try:
            info = check_signature_integrity(src.root)
            signature = {"status": "intact", "key_id": info.key_id,
                         "detail": f"Ed25519 signature over the certificate and {info.files} files is valid under the key "
                                   f"embedded in {SIGNATURE_FILE}; authorship needs that key id checked against the "
                                   "signer's published key (`domainguard verify BUNDLE --pubkey KEY`)"}
        except BundleError as exc:
            signature = {"status": "invalid", "key_id": None, "detail": str(exc)}
    ok = all(r["status"] in ("match", "not checked") for r in rows) and signature["status"] != "invalid"
    return {"ok": ok, "files": rows, "signature": signature}


def _rate(d: dict | None, name: str) -> float | None:
    """A leakage rate for ``name`` ("guarded"/"dense") in the leak-test record, however it is nested."""
    if not isinstance(d, dict):
        return None
    for key in (f"{name}_leakage_rate", f"{name}_rate", f"leakage_rate_{name}"):
        if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
            return float(d[key])
    v = d.get(name)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, dict):
        for key in ("leakage_rate", "rate", "leak_rate"):
            if isinstance(v.get(key), (int, float)) and not isinstance(v.get(key), bool):
                return float(v[key])
    return None


def _audit_failed(audit: dict | None) -> str | None:
    if not isinstance(audit, dict):
        return None
    if audit.get("clean") is False or audit.get("ok") is False or audit.get("passed") is False:
        return "the graph audit found sequence-mixing operations outside guarded attention"
    st = audit.get("status")
    if isinstance(st, str) and st.upper() in ("REFUTED", "FAIL", "FAILED"):
        return f"the graph audit reports {st}"
    return None


def _witnesses(claim: dict) -> list[dict]:
    """Witness paths as {text, steps}; other witnesses (audit findings, leaking trials) as text only."""
    out = []
    for w in claim.get("witness") or []:
        if isinstance(w, dict) and isinstance(w.get("steps"), list):
            steps = [s for s in w["steps"] if isinstance(s, dict)]
            out.append({"text": str(w.get("text") or " → ".join(f"{s.get('domain')}@{s.get('level')}" for s in steps)),
                        "steps": [{"domain": str(s.get("domain")), "level": int(s.get("level", 0)),
                                   "via": str(s.get("via", "attention"))} for s in steps]})
        elif isinstance(w, dict):
            out.append({"text": "; ".join(f"{k}: {w[k]}" for k in sorted(w)), "steps": []})
        else:
            out.append({"text": str(w), "steps": []})
    return out


def _claim_row(claim: dict) -> dict:
    details = claim.get("details") or {}
    loc = details.get("location") if isinstance(details.get("location"), dict) else None
    return {
        "id": str(claim.get("id")),
        "kind": str(claim.get("kind")),
        "statement": str(claim.get("statement")),
        "status": _status(claim.get("status")),
        "method": claim.get("method") or {},
        "scope": claim.get("scope") or {},
        "witness": _witnesses(claim),
        "reason": claim.get("reason"),
        "location": loc,
        "rule": details.get("rule") if isinstance(details.get("rule"), dict) else None,
        "unbounded": details.get("unbounded"),
        "explanation": details.get("explanation"),
        "details": {k: v for k, v in details.items() if k not in ("location", "rule", "unbounded", "explanation")},
        "rechecked": None,  # filled in by build() where the policy lets the claim be re-derived
    }


def _recheck(compiled, cert: dict, notes: list[str]) -> tuple[dict | None, list[str]]:
    """Re-derive the policy claims (forbid rules, profiles) and the length-free tile-table proofs from the
    directory's policy: ({claim id: status}, where the certificate's words are not domainguard's)."""
    if compiled is None:
        return None, []
    from .artifact import table_claims
    from .bundle import stated_problems
    from .certificate import Certificate
    from .verify import verify

    try:
        v = verify(compiled, explain=False)
        tables = table_claims(compiled)
    except DomainGuardError as exc:
        notes.append(f"the claims could not be re-derived from the policy: {exc}")
        return None, []
    worded = stated_problems(Certificate.model_validate(cert), v)
    return {**{r.id: r.status.value for r in v.results}, **{c["id"]: c["status"] for c in tables}}, worded


def _shown_verdict(cert: dict, claims: list[dict], integrity: dict, leak: dict | None, audit: dict | None,
                   rechecked: dict | None = None, worded: list[str] = ()) -> dict:
    """The verdict to display: the certificate's, or weaker, with every reason it is weaker.

    ``rechecked`` maps claim ids to the status re-derived now; a claim counts as the weaker of the two, and a
    re-derived claim the certificate does not carry counts too. ``worded``: where the certificate's words
    (assumptions, threat model, claim statements) are not domainguard's; any of them keeps PROVED from showing.
    """
    cert_v = _status(cert.get("verdict"))
    reasons: list[str] = []
    if cert.get("verdict") not in STATUSES:
        reasons.append(f"the certificate's verdict {cert.get('verdict')!r} is not PROVED, REFUTED or UNKNOWN")
    statuses = [c["status"] for c in claims]
    effective = list(statuses)
    for cid, st in sorted((rechecked or {}).items()):
        mine = [c for c in claims if c["id"] == cid]
        if not mine:
            if st != "PROVED":  # a proved claim the certificate left out weakens nothing
                reasons.append(f"re-derived from the policy, {cid} is {st}, and the certificate does not carry it")
                effective.append(st)
        elif any(_combine([c["status"], st]) != c["status"] for c in mine):
            # Only a weaker re-derivation counts; a stronger one needs a new certificate, not a better report.
            reasons.append(f"re-derived from the policy, {cid} is {st}; the certificate says {mine[0]['status']}")
            effective.append(st)
    claims_v = _combine(effective)
    if not claims:
        reasons.append("the certificate contains no claims, so nothing was proved")
    elif claims_v != cert_v:
        reasons.append(f"the certificate's verdict {cert_v} disagrees with its claims (combined: {claims_v})")
    for c in claims:
        if c["status"] != "PROVED":
            reasons.append(f"{c['id']} is {c['status']}: {c['statement']}")
    if not integrity["ok"]:
        bad = [r["item"] for r in integrity["files"] if r["status"] in ("mismatch", "missing")]
        if bad:
            reasons.append("digests do not match the certificate: " + ", ".join(bad))
        if integrity["signature"]["status"] == "invalid":
            reasons.append("the signature does not check out: " + integrity["signature"]["detail"])
    guarded = _rate(leak, "guarded")
    if guarded is not None and guarded > 0:
        reasons.append(f"the leak test measured a guarded leakage rate of {guarded:g} (must be 0)")
    audit_bad = _audit_failed(audit)
    if audit_bad:
        reasons.append(audit_bad)
    reasons += [f"the certificate's words were changed: {w}" for w in worded]
    problems = (not integrity["ok"]) or (guarded is not None and guarded > 0) or bool(audit_bad) or bool(worded)
    if rechecked is None and cert_v == "PROVED":
        # Nothing to re-derive the claims from (no policy): a PROVED that could not be checked is not shown.
        reasons.append("there is no policy to re-derive the claims and tables from, so the certificate's PROVED "
                       "could not be checked")
        problems = True
    if cert_v == "PROVED" and claims_v == "PROVED" and claims and not problems:
        shown = "PROVED"
    elif "REFUTED" in (cert_v, claims_v):
        shown = "REFUTED"
    else:
        shown = "UNKNOWN"
    if shown != cert_v:
        reasons.insert(0, f"the certificate says {cert_v}; this report shows {shown} (never more than the evidence)")
    counts = {s: statuses.count(s) for s in STATUSES}
    return {"certificate": cert_v, "shown": shown, "claims": claims_v, "counts": counts, "reasons": reasons}


def _domains(compiled, policy_dict: dict | None) -> list[dict]:
    if compiled is None:
        return []
    tree = compiled.flow.tree
    desc: dict[str, str] = {}

    def walk(doms: dict) -> None:
        for name, node in (doms or {}).items():
            if isinstance(node, dict):
                if node.get("description"):
                    desc[name] = str(node["description"])
                walk(node.get("children") or {})

    walk((policy_dict or {}).get("domains") or {})
    depth = []
    for i, parent in enumerate(tree.parents):
        depth.append(0 if parent < 0 else depth[parent] + 1)
    gen = compiled.generation_id
    return [{"id": i, "name": n, "parent": (tree.names[tree.parents[i]] if tree.parents[i] >= 0 else None),
             "depth": depth[i], "description": desc.get(n), "generation": i == gen}
            for i, n in enumerate(tree.names)]


def _relations(compiled) -> list[dict]:
    """Layers grouped by identical relation: [{layers, matrix (reader × source, 0/1)}]."""
    if compiled is None:
        return []
    rel = compiled.relations
    groups: list[dict] = []
    for layer in range(rel.shape[0]):
        m = rel[layer]
        for g in groups:
            if (g["_m"] == m).all():
                g["layers"].append(layer)
                break
        else:
            groups.append({"layers": [layer], "_m": m})
    return [{"layers": g["layers"], "matrix": g["_m"].astype(int).tolist()} for g in groups]


_EXAMPLE_DOMAINS = 24  # at most this many domains in the example layout


def _example_blockmap(compiled, notes: list[str]) -> dict | None:
    """An illustrative layout (one segment per domain, generation domain last) and its tile kinds."""
    if compiled is None:
        return None
    try:
        import torch

        from .blockmap import build_blockmap
        from .layout import Layout
    except ImportError as exc:
        notes.append(f"example block map omitted: {exc}")
        return None
    D = compiled.num_domains
    gen = compiled.generation_id
    order = [d for d in range(D) if d != gen][: _EXAMPLE_DOMAINS - (gen is not None)]
    if gen is not None:
        order.append(gen)
    seg = max(6, min(24, 320 // len(order)))
    block = 16 if seg >= 12 else 8
    segments, ids, start = [], [], 0
    for d in order:
        segments.append({"domain": compiled.domains[d], "start": start, "length": seg})
        ids += [d] * seg
        start += seg
    layers = sorted({0, compiled.num_layers - 1})
    maps = []
    try:
        layout = Layout.from_ids(compiled, torch.tensor([ids], dtype=torch.long))
        for layer in layers:
            bm = build_blockmap(layout, compiled, layer, block_q=block, block_k=block)
            kinds = bm.kinds[0, 0].to(torch.int64).tolist()
            flat = [k for row in kinds for k in row]
            total = len(flat)
            maps.append({"layer": layer, "kinds": kinds,
                         "tiles": {"empty": flat.count(0), "partial": flat.count(1), "full": flat.count(2), "total": total}})
    except (DomainGuardError, AttributeError, TypeError) as exc:
        notes.append(f"example block map omitted: {exc}")
        return None
    if len(maps) == 2 and maps[0]["kinds"] == maps[1]["kinds"]:
        maps = maps[:1]
        maps[0]["layer_note"] = "every layer shown has the same tiles"
    subset = f" (the first {len(order)} of {D} domains)" if len(order) < D else ""
    return {"block": block, "tokens": len(ids), "segments": segments, "maps": maps,
            "note": "An illustrative layout chosen by the report, not a certified input: one segment of "
                    f"{seg} tokens per domain{subset}, the generation domain last, {block}x{block} tiles."}


def _sparsity(cert: dict, blockmap: dict | None) -> dict:
    recorded = None
    for part in ("leak_test", "audit"):
        d = cert.get(part)
        if isinstance(d, dict) and isinstance(d.get("sparsity"), dict):
            recorded = d["sparsity"]
    example = None
    if blockmap and blockmap["maps"]:
        rows = []
        for m in blockmap["maps"]:
            t = m["tiles"]
            rows.append({"layer": m["layer"], "empty": t["empty"], "partial": t["partial"], "full": t["full"],
                         "total": t["total"], "flops_saved": t["empty"] / t["total"] if t["total"] else 0.0})
        example = {"tokens": blockmap["tokens"], "block": blockmap["block"], "layers": rows}
    return {"recorded": recorded, "example": example}


# Limits every report states, unless the certificate already says so (keyword → sentence).
NOT_COVERED_ALWAYS = [
    ("weights", "Knowledge already stored in the model weights (training data memorisation): masks isolate context "
                "tokens, not what the model learned before it was guarded."),
    ("label", "Correctness of the domain labels the caller assigns to each token: a mislabelled token is treated "
              "as its label."),
    ("timing", "Channels outside the attention masks the policy compiles: timing, memory, batching, sampling and "
               "tooling around the model."),
    ("accuracy", "Accuracy, fairness, robustness to adversarial prompts within a domain, and human oversight: this "
                 "report is evidence of information-flow isolation only."),
]

# Section id → (EU AI Act Annex IV items, NIST AI RMF 1.0 functions/subcategories, ISO/IEC 42001:2023 Annex A controls).
# The table says where evidence for an item can be found; it is not a conformity assessment.
COMPLIANCE = [
    ("verdict", "Verdict and integrity",
     ["2(g) validation and testing procedures; test reports dated and signed"],
     ["MEASURE 2.3 (assurance criteria measured and demonstrated)", "MEASURE 2.7 (security and resilience evaluated and documented)"],
     ["A.6.2.4 AI system verification and validation"]),
    ("system", "System and deployment profile",
     ["1(a) intended purpose, provider, version", "2(b) design specifications, key design choices and assumptions"],
     ["MAP 2.1 (tasks and methods defined)"],
     ["A.6.2.2 AI system requirements and specification", "A.9.4 Intended use of the AI system"]),
    ("domains", "Domain tree and per-layer relations",
     ["2(b) general logic of the AI system and of the algorithms", "2(c) system architecture"],
     ["MAP 2.1 (tasks and methods defined)", "MEASURE 2.9 (model explained, validated and documented)"],
     ["A.6.2.3 Documentation of AI system design and development"]),
    ("rules", "Forbid rules and witnesses",
     ["2(g) validation and testing procedures and results", "2(h) cybersecurity measures"],
     ["MEASURE 2.7 (security and resilience evaluated and documented)", "MEASURE 2.10 (privacy risk examined and documented)"],
     ["A.6.2.4 AI system verification and validation"]),
    ("explanations", "Z3 explanations",
     ["2(b) key design choices, rationale and assumptions"],
     ["MEASURE 2.9 (model explained, validated and documented)"],
     ["A.6.2.3 Documentation of AI system design and development"]),
    ("audit", "Graph audit",
     ["2(g) validation and testing procedures", "2(h) cybersecurity measures"],
     ["MEASURE 2.7 (security and resilience evaluated and documented)"],
     ["A.6.2.4 AI system verification and validation"]),
    ("leak", "Leak test",
     ["2(g) metrics and test logs", "4 appropriateness of the performance metrics"],
     ["MEASURE 2.1 (test sets, metrics and tools documented)", "MEASURE 2.10 (privacy risk examined and documented)"],
     ["A.6.2.4 AI system verification and validation"]),
    ("sparsity", "Sparsity and FLOPs saved",
     ["2(b) design choices and trade-offs", "2(c) computational resources"],
     ["MEASURE 2.12 (environmental impact and sustainability assessed)"],
     ["A.4.5 System and computing resources"]),
    ("assumptions", "Assumptions and threat model",
     ["3 capabilities and limitations, foreseeable unintended outcomes, sources of risk", "5 risk management system (Article 9)"],
     ["MAP 2.2 (knowledge limits documented)", "MEASURE 1.1 (risks that cannot be measured documented)"],
     ["A.5.2 AI system impact assessment process", "A.6.2.7 AI system technical documentation"]),
    ("digests", "Digests, signature and tool versions",
     ["1(c) versions of relevant software", "2(a) tools provided by third parties", "6 changes through the lifecycle"],
     ["MEASURE 2.1 (test sets, metrics and tools documented)"],
     ["A.4.4 Tooling resources", "A.6.2.7 AI system technical documentation"]),
]
NOT_EVIDENCED = ("Not evidenced by this report: Annex IV 1(b), 1(d)-(h), 2(d) data requirements, 2(e) human "
                 "oversight, 2(f) pre-determined changes, 7 harmonised standards, 8 EU declaration of conformity, "
                 "9 post-market monitoring; NIST AI RMF GOVERN and MANAGE; ISO/IEC 42001 A.2, A.3, A.7, A.8, A.10.")


def build(path: str | Path) -> dict:
    """The report data for a compiled directory or bundle: a JSON-able dict valid under ``REPORT_SCHEMA``."""
    return _build(_load(path))


def _build(src: _Source) -> dict:
    from . import __version__

    cert = src.cert
    subject = cert.get("subject") or {}
    policy_dict = None
    if src.compiled is not None:
        policy_dict = json.loads(src.compiled.canonical_policy)
    claims = [_claim_row(c) for c in cert.get("claims") or [] if isinstance(c, dict)]
    integrity = _integrity(src)
    leak = cert.get("leak_test") if isinstance(cert.get("leak_test"), dict) else None
    audit = cert.get("audit") if isinstance(cert.get("audit"), dict) else None
    rechecked, worded = _recheck(src.compiled, cert, src.notes)
    for c in claims:
        c["rechecked"] = (rechecked or {}).get(c["id"])
    verdict = _shown_verdict(cert, claims, integrity, leak, audit, rechecked, worded)
    scope = cert.get("scope") or {}
    profile = scope.get("profile") if isinstance(scope.get("profile"), str) else None
    prof_def = ((policy_dict or {}).get("profiles") or {}).get(profile) if profile else None
    blockmap = _example_blockmap(src.compiled, src.notes)
    threat = cert.get("threat_model") if isinstance(cert.get("threat_model"), dict) else {}
    listed = threat.get("not_covered")
    not_covered = [str(x) for x in listed] if isinstance(listed, list) else []
    said = " ".join(not_covered).lower()
    not_covered += [text for word, text in NOT_COVERED_ALWAYS if word not in said]
    raw = src.cert_path.read_bytes()
    from .signing import canonical_certificate

    data = {
        "format": REPORT_FORMAT,
        "generator": {"name": "domainguard", "version": __version__},
        "title": f"domainguard audit report: {(subject.get('policy') or {}).get('name') or 'unnamed policy'}",
        "source": {"certificate": src.cert_path.name, "certificate_sha256": hashlib.sha256(raw).hexdigest(),
                   "canonical_sha256": hashlib.sha256(canonical_certificate(cert)).hexdigest(),
                   "certificate_format": cert.get("format")},
        "verdict": verdict,
        "integrity": integrity,
        "system": {
            "policy": {"name": (subject.get("policy") or {}).get("name"),
                       "description": (policy_dict or {}).get("description"),
                       "file": (subject.get("policy") or {}).get("file")},
            "model": subject.get("model"),
            "weights": subject.get("weights"),
            "scope": scope,
            "profile": {"name": profile, "definition": prof_def},
            "generation": scope.get("generation") or (policy_dict or {}).get("generation", {}).get("domain"),
            "positions": scope.get("positions") or (policy_dict or {}).get("positions"),
            "reads": (policy_dict or {}).get("reads") or {},
            "layer_overrides": (policy_dict or {}).get("layers") or [],
            "patterns": (policy_dict or {}).get("patterns") or {},
        },
        "domains": _domains(src.compiled, policy_dict),
        "relations": _relations(src.compiled),
        "blockmap": blockmap,
        "rules": [c for c in claims if c["kind"] in FORBID_KINDS],
        "claims": claims,
        "findings": [f for f in cert.get("findings") or [] if isinstance(f, dict)],
        "audit": audit,
        "leak_test": {"record": leak, "guarded_rate": _rate(leak, "guarded"), "dense_rate": _rate(leak, "dense")},
        "sparsity": _sparsity(cert, blockmap),
        "assumptions": [str(a) for a in cert.get("assumptions") or []],
        "threat_model": threat,
        "not_covered": not_covered,
        "digests": subject,
        "tools": cert.get("tools") or {},
        "compliance": [{"section": sid, "title": t, "eu_ai_act_annex_iv": eu, "nist_ai_rmf": nist, "iso_iec_42001": iso}
                       for sid, t, eu, nist, iso in COMPLIANCE],
        "compliance_note": NOT_EVIDENCED,
        "notes": list(src.notes),
    }
    return json.loads(json.dumps(data, default=str))  # plain JSON types only (numpy scalars, paths → str)


_STATUS_ENUM = {"enum": list(STATUSES)}
_STR_OR_NULL = {"type": ["string", "null"]}
REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://domainguard.invalid/schemas/report-1.json",
    "title": "domainguard audit report (JSON form)",
    "type": "object",
    "additionalProperties": False,
    "required": ["format", "generator", "title", "source", "verdict", "integrity", "system", "domains", "relations",
                 "blockmap", "rules", "claims", "findings", "audit", "leak_test", "sparsity", "assumptions",
                 "threat_model", "not_covered", "digests", "tools", "compliance", "compliance_note", "notes"],
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "generator": {"type": "object", "required": ["name", "version"]},
        "title": {"type": "string", "minLength": 1},
        "source": {"type": "object", "required": ["certificate", "certificate_sha256", "canonical_sha256"],
                   "properties": {"certificate_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                  "canonical_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
        "verdict": {
            "type": "object", "additionalProperties": False,
            "required": ["certificate", "shown", "claims", "counts", "reasons"],
            "properties": {
                "certificate": _STATUS_ENUM, "shown": _STATUS_ENUM, "claims": _STATUS_ENUM,
                "counts": {"type": "object", "required": list(STATUSES),
                           "additionalProperties": False,
                           "properties": {s: {"type": "integer", "minimum": 0} for s in STATUSES}},
                "reasons": {"type": "array", "items": {"type": "string"}},
            },
            # Never more than the evidence: PROVED is shown only with no reason against it.
            "if": {"properties": {"shown": {"const": "PROVED"}}},
            "then": {"properties": {"certificate": {"const": "PROVED"}, "claims": {"const": "PROVED"},
                                    "reasons": {"maxItems": 0},
                                    "counts": {"properties": {"REFUTED": {"const": 0}, "UNKNOWN": {"const": 0},
                                                              "PROVED": {"minimum": 1}}}}},
        },
        "integrity": {
            "type": "object", "required": ["ok", "files", "signature"],
            "properties": {
                "ok": {"type": "boolean"},
                "files": {"type": "array", "items": {
                    "type": "object", "required": ["item", "expected", "actual", "status"],
                    "properties": {"status": {"enum": ["match", "mismatch", "missing", "not checked"]}}}},
                "signature": {"type": "object", "required": ["status", "detail"],
                              "properties": {"status": {"enum": ["absent", "intact", "invalid"]},
                                             "key_id": _STR_OR_NULL}},
            },
        },
        "system": {"type": "object", "required": ["policy", "scope", "profile"]},
        "domains": {"type": "array", "items": {
            "type": "object", "required": ["id", "name", "parent", "depth"],
            "properties": {"id": {"type": "integer", "minimum": 0}, "name": {"type": "string"},
                           "parent": _STR_OR_NULL, "depth": {"type": "integer", "minimum": 0}}}},
        "relations": {"type": "array", "items": {
            "type": "object", "required": ["layers", "matrix"],
            "properties": {"layers": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                           "matrix": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}}}}}},
        "blockmap": {"type": ["object", "null"]},
        "rules": {"type": "array", "items": {"$ref": "#/$defs/claim"}},
        "claims": {"type": "array", "items": {"$ref": "#/$defs/claim"}},
        "findings": {"type": "array", "items": {"type": "object", "required": ["code", "severity", "message"]}},
        "audit": {"type": ["object", "null"]},
        "leak_test": {"type": "object", "required": ["record", "guarded_rate", "dense_rate"],
                      "properties": {"guarded_rate": {"type": ["number", "null"], "minimum": 0},
                                     "dense_rate": {"type": ["number", "null"], "minimum": 0}}},
        "sparsity": {"type": "object", "required": ["recorded", "example"]},
        "assumptions": {"type": "array", "items": {"type": "string"}},
        "threat_model": {"type": "object"},
        "not_covered": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "digests": {"type": "object"},
        "tools": {"type": "object"},
        "compliance": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["section", "title", "eu_ai_act_annex_iv", "nist_ai_rmf", "iso_iec_42001"],
            "properties": {"section": {"type": "string"}, "title": {"type": "string"},
                           "eu_ai_act_annex_iv": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                           "nist_ai_rmf": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                           "iso_iec_42001": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}},
        "compliance_note": {"type": "string"},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "$defs": {
        "claim": {
            "type": "object",
            "required": ["id", "kind", "statement", "status", "method", "scope", "witness", "reason", "location",
                         "rechecked"],
            "properties": {
                "status": _STATUS_ENUM,
                "witness": {"type": "array", "items": {
                    "type": "object", "required": ["text", "steps"],
                    "properties": {"steps": {"type": "array", "items": {
                        "type": "object", "required": ["domain", "level", "via"],
                        "properties": {"level": {"type": "integer", "minimum": 0}}}}}}},
                "location": {"type": ["object", "null"], "required": ["file", "line"]},
                "rechecked": {"enum": list(STATUSES) + [None]},
            },
            # A witness belongs to a refutation; a PROVED or UNKNOWN claim never shows one as its result.
            "if": {"properties": {"status": {"const": "REFUTED"}}},
            "else": {"properties": {"witness": {"maxItems": 0}}},
        },
    },
}


def report_schema() -> dict:
    """JSON Schema (draft 2020-12) of the JSON report."""
    return json.loads(json.dumps(REPORT_SCHEMA))


# =============================================================================================
# 3. Vector drawings (rendered to SVG and to PDF): coordinates in points, origin top-left, y down
# =============================================================================================
# Adobe Helvetica / Helvetica-Bold advance widths (1/1000 em) for ASCII 32..126; Courier is 600 throughout.
_W_REG = [int(x) for x in (
    "278 278 355 556 556 889 667 191 333 333 389 584 278 333 278 278 556 556 556 556 556 556 556 556 556 556 "
    "278 278 584 584 584 556 1015 667 667 722 722 667 611 778 722 278 500 667 556 833 722 778 667 778 722 667 "
    "611 722 667 944 667 667 611 278 278 278 469 556 333 556 556 500 556 556 278 556 556 222 222 500 222 833 "
    "556 556 556 556 333 500 278 556 500 722 500 500 500 334 260 334 584").split()]
_W_BOLD = [int(x) for x in (
    "278 333 474 556 556 889 722 238 333 333 389 584 278 333 278 278 556 556 556 556 556 556 556 556 556 556 "
    "333 333 584 584 584 611 975 722 722 722 722 667 611 778 722 278 556 722 611 833 722 778 667 778 722 667 "
    "611 722 667 944 667 667 611 333 278 333 584 556 333 556 611 556 611 556 333 611 611 278 278 556 278 889 "
    "611 611 611 611 389 556 333 611 556 778 556 556 500 389 280 389 584").split()]
# Characters outside WinAnsi, spelled with characters inside it (PDF standard fonts are WinAnsi only).
_ASCII_FOR = {"→": "->", "←": "<-", "↻": "=>", "⇒": "=>", "≤": "<=", "≥": ">=", "≠": "!=", "✓": "yes", "✗": "no",
              "×": "x", "…": "...", "–": "-", "—": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "•": "-", "\u00a0": " ",
              "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ı": "i", "œ": "oe", "Œ": "OE"}


def _pdf_safe(text: str) -> str:
    """``text`` in characters the standard PDF fonts can show: WinAnsi's Latin-1 part, else transliterated."""
    out = []
    for ch in text:
        if ch in _ASCII_FOR:
            out.append(_ASCII_FOR[ch])
        elif 32 <= ord(ch) < 127 or 0xA1 <= ord(ch) <= 0xFF:
            out.append(ch)
        elif ch in "\t\n":
            out.append(" ")
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", ch) if 32 <= ord(c) < 127)
            out.append(base or "?")
    return "".join(out)


def text_width(text: str, size: float, *, bold: bool = False, mono: bool = False) -> float:
    """Width in points of ``text`` set in Helvetica (or Courier) at ``size``, as the PDF writer sets it."""
    if mono:
        return 0.6 * size * len(_pdf_safe(text))
    table = _W_BOLD if bold else _W_REG
    total = 0
    for ch in _pdf_safe(text):
        o = ord(ch)
        total += table[o - 32] if 32 <= o < 127 else 556
    return total * size / 1000.0


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str | None = None
    stroke: str | None = None
    width: float = 1.0
    dash: bool = False


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str = INK
    width: float = 1.0
    dash: bool = False


@dataclass(frozen=True)
class Poly:
    points: tuple[tuple[float, float], ...]
    fill: str | None = None
    stroke: str | None = None
    width: float = 1.0
    closed: bool = True
    dash: bool = False


@dataclass(frozen=True)
class Label:
    x: float
    y: float  # baseline
    text: str
    size: float = 9.0
    fill: str = INK
    anchor: str = "start"  # start | middle | end
    bold: bool = False
    mono: bool = False
    angle: float = 0.0  # degrees, clockwise on the page (SVG sense)


@dataclass(frozen=True)
class Raster:
    """A pixel image (RGB bytes, row-major, top row first) stretched over a box, pixels kept sharp."""

    x: float
    y: float
    w: float
    h: float
    px_w: int
    px_h: int
    rgb: bytes


Shape = Union[Rect, Line, Poly, Label, Raster]


@dataclass(frozen=True)
class Drawing:
    width: float
    height: float
    shapes: tuple[Shape, ...]
    title: str
    alt: str  # a text rendering of the same information (screen readers, Markdown)


def _arrow(x1: float, y1: float, x2: float, y2: float, color: str, width: float = 1.2, dash: bool = False,
           head: float = 6.0) -> list[Shape]:
    """A line from (x1, y1) ending in a filled arrowhead at (x2, y2)."""
    ang = math.atan2(y2 - y1, x2 - x1)
    bx, by = x2 - head * math.cos(ang), y2 - head * math.sin(ang)
    left = (bx + head * 0.45 * math.sin(ang), by - head * 0.45 * math.cos(ang))
    right = (bx - head * 0.45 * math.sin(ang), by + head * 0.45 * math.cos(ang))
    return [Line(x1, y1, bx, by, color, width, dash), Poly(((x2, y2), left, right), fill=color)]


def _fit(text: str, size: float, max_w: float, bold: bool = False) -> str:
    text = text[:400]  # no picture shows more; bounds the trimming below
    if text_width(text, size, bold=bold) <= max_w:
        return text
    while text and text_width(text + "...", size, bold=bold) > max_w:
        text = text[:-1]
    return text + "..."


_TREE_MAX = 60  # domains drawn in the tree picture; the rest are listed as text
_RELATION_FIGURES = 16  # distinct per-layer relations drawn; all are in the JSON report


def draw_domain_tree(domains: list[dict], forbidden: dict[str, list[str]] | None = None) -> Drawing:
    """The domain tree as an indented outline with elbow connectors; the generation domain is outlined in blue."""
    forbidden = forbidden or {}
    rest = len(domains) - _TREE_MAX
    domains = domains[:_TREE_MAX]
    row, indent, x0 = 22.0, 22.0, 8.0
    shapes: list[Shape] = []
    y_of: dict[str, float] = {}
    width = 200.0
    alt = []
    for i, d in enumerate(domains):
        y = 10 + i * row
        x = x0 + d["depth"] * indent
        y_of[d["name"]] = y
        label = f"{d['name']}  (id {d['id']})"
        w = text_width(label, 9, bold=True) + 12
        gen = d.get("generation")
        shapes.append(Rect(x, y, w, 16, fill="#f6f8fa" if not gen else "#ddf4ff", stroke=ACCENT if gen else GRID,
                           width=1.5 if gen else 0.8))
        shapes.append(Label(x + 6, y + 11.5, label, 9, INK, bold=True))
        extra = []
        if gen:
            extra.append("generation domain")
        if d.get("description"):
            extra.append(str(d["description"]))
        if d["name"] in forbidden:
            extra.append("forbid: " + ", ".join(forbidden[d["name"]]))
        if extra:
            note = _fit(" · ".join(extra), 8, 420)
            shapes.append(Label(x + w + 8, y + 11.5, note, 8, MUTED))
            width = max(width, x + w + 8 + text_width(note, 8) + 8)
        width = max(width, x + w + 8)
        if d["parent"] is not None:
            py = y_of[d["parent"]] + 16
            px = x0 + (d["depth"] - 1) * indent + 8
            shapes.append(Line(px, py, px, y + 8, MUTED, 0.8))
            shapes.append(Line(px, y + 8, x, y + 8, MUTED, 0.8))
        alt.append("  " * d["depth"] + f"- {d['name']} (id {d['id']})" + (f": {'; '.join(extra)}" if extra else ""))
    height = 10 + len(domains) * row + 4
    if rest > 0:
        more = f"... and {rest} more domains (every domain is in the domain list below and in the JSON report)"
        shapes.append(Label(x0, height + 8, more, 8.5, MUTED))
        alt.append(more)
        height += 16
        width = max(width, x0 + text_width(more, 8.5) + 8)
    return Drawing(width, height, tuple(shapes), "Domain tree (pre-order ids)", "\n".join(alt))


_VECTOR_MATRIX_MAX = 40  # above this many domains a relation is drawn as one pixel per (reader, source)


def _hex_bytes(color: str) -> bytes:
    return bytes.fromhex(color.lstrip("#"))


def draw_matrix(names: list[str], matrix: list[list[int]], title: str,
                witness_cells: set[tuple[int, int]] = frozenset()) -> Drawing:
    """Reader × source relation: a filled cell means tokens of the row's domain may attend tokens of the column's."""
    D = len(names)
    legend = "rows: reader · columns: source · dark: may attend · red: edge of a witness path"
    alt = [title + " (# may attend, . may not, X edge of a witness path)",
           "reader \\ source: " + " ".join(str(i) for i in range(D))]
    for i in range(D):
        alt.append(f"{i:>3} {names[i]:<16} " + " ".join("X" if (i, j) in witness_cells else "#" if matrix[i][j] else "."
                                                        for j in range(D)))
    if D > _VECTOR_MATRIX_MAX:
        # One pixel per pair; ticks give domain ids (names in the domain list).
        on, off, red = _hex_bytes("#0550ae"), _hex_bytes("#ffffff"), _hex_bytes(WITNESS)
        rgb = b"".join(red if (i, j) in witness_cells else on if matrix[i][j] else off
                       for i in range(D) for j in range(D))
        side, left, top = 420.0, 34.0, 22.0
        shapes: list[Shape] = [Rect(left - 0.5, top - 0.5, side + 1, side + 1, stroke=MUTED, width=0.6),
                               Raster(left, top, side, side, D, D, rgb)]
        step = max(1, round(D / 8 / 10) * 10) if D >= 80 else 10
        for k in range(0, D, step):
            pos = (k + 0.5) * side / D
            shapes.append(Label(left + pos, top - 5, str(k), 6.5, MUTED, anchor="middle"))
            shapes.append(Label(left - 4, top + pos + 2.2, str(k), 6.5, MUTED, anchor="end"))
        shapes.append(Label(left, top + side + 14, legend + f" · {D} domains, ticks are domain ids", 7.5, MUTED))
        w = max(left + side + 10, left + text_width(legend + f" · {D} domains, ticks are domain ids", 7.5) + 6)
        return Drawing(w, top + side + 22, tuple(shapes), title, "\n".join(alt))
    cell = max(6.0, min(18.0, 420.0 / max(D, 1)))
    show_names = cell >= 9
    lab = [n if show_names else str(i) for i, n in enumerate(names)]
    fs = min(9.0, cell * 0.75)
    left = max(text_width(s, fs) for s in lab) + 10 if lab else 10
    top = (max(text_width(s, fs) for s in lab) * 0.72 + 16) if lab else 16
    shapes = []
    for j, s in enumerate(lab):  # column labels, rotated
        cx = left + j * cell + cell / 2
        shapes.append(Label(cx + 2, top - 6, s, fs, MUTED, angle=-45))
    for i, s in enumerate(lab):
        shapes.append(Label(left - 5, top + i * cell + cell / 2 + fs * 0.35, s, fs, MUTED, anchor="end"))
        for j in range(D):
            on = bool(matrix[i][j])
            shapes.append(Rect(left + j * cell, top + i * cell, cell, cell,
                               fill=("#0550ae" if on else "#ffffff"), stroke=GRID, width=0.5))
        shapes.append(Rect(left + i * cell + 1, top + i * cell + 1, cell - 2, cell - 2, stroke="#8c959f", width=0.6,
                           dash=True))
    for (i, j) in sorted(witness_cells):
        shapes.append(Rect(left + j * cell + 0.5, top + i * cell + 0.5, cell - 1, cell - 1, stroke=WITNESS, width=2.0))
    w = left + D * cell + 10
    h = top + D * cell + 24
    shapes.append(Label(left, h - 8, legend, 7.5, MUTED))
    w = max(w, left + text_width(legend, 7.5) + 6)
    return Drawing(w, h, tuple(shapes), title, "\n".join(alt))


def draw_blockmap(kinds: list[list[int]], segments: list[dict], block: int, title: str) -> Drawing:
    """Tile kinds of an example layout: white EMPTY (never loaded), grey PARTIAL (element mask), blue FULL."""
    tq = len(kinds)
    tk = len(kinds[0]) if kinds else 0
    cell = max(4.0, min(14.0, 420.0 / max(tq, tk, 1)))
    left, top = 92.0, 84.0
    colors = {0: "#ffffff", 1: "#afb8c1", 2: "#0550ae"}
    shapes: list[Shape] = []
    for i in range(tq):
        for j in range(tk):
            shapes.append(Rect(left + j * cell, top + i * cell, cell, cell, fill=colors.get(kinds[i][j], "#ffffff"),
                               stroke=GRID, width=0.4))
    palette = ["#ddf4ff", "#fff8c5", "#dafbe1", "#fbefff", "#ffebe9", "#f6f8fa"]
    for n, seg in enumerate(segments):  # domain bands along both axes, in token units → tile units
        a, b = seg["start"] / block * cell, (seg["start"] + seg["length"]) / block * cell
        col = palette[n % len(palette)]
        shapes.append(Rect(left + a, top - 12, b - a, 10, fill=col, stroke=GRID, width=0.4))
        shapes.append(Rect(left - 12, top + a, 10, b - a, fill=col, stroke=GRID, width=0.4))
        shapes.append(Label(left + (a + b) / 2, top - 16, seg["domain"], 7, MUTED, angle=-45))
        shapes.append(Label(left - 16, top + (a + b) / 2 + 2.5, seg["domain"], 7, MUTED, anchor="end"))
    y = top + tq * cell + 16
    x = left
    for k, name in ((0, "EMPTY (skipped)"), (1, "PARTIAL (masked)"), (2, "FULL (no mask)")):
        shapes.append(Rect(x, y - 8, 10, 10, fill=colors[k], stroke=MUTED, width=0.6))
        shapes.append(Label(x + 14, y, name, 8, INK))
        x += 18 + text_width(name, 8) + 12
    shapes.append(Label(left, y + 14, "rows: query tiles · columns: key tiles", 7.5, MUTED))
    w = max(left + tk * cell + 10, x)
    glyph = {0: ".", 1: "+", 2: "#"}
    alt = [title + " (. EMPTY, + PARTIAL, # FULL)"] + ["".join(glyph.get(k, "?") for k in row) for row in kinds]
    return Drawing(w, y + 22, tuple(shapes), title, "\n".join(alt))


def draw_witness(path: dict, num_layers: int | None) -> Drawing:
    """A witness path on the layered graph: columns are levels (one panel per decode pass), rows are domains."""
    steps = path.get("steps") or []
    if not steps:
        return Drawing(420, 28, (Label(4, 18, _fit(path["text"], 10, 410), 10, WITNESS, mono=True),),
                       "Witness path", path["text"])
    # Positions: pass p increments at every decode step; x = (p, level).
    L = num_layers if isinstance(num_layers, int) else max(s["level"] for s in steps)
    rows: list[str] = []
    for s in steps:
        if s["domain"] not in rows:
            rows.append(s["domain"])
    passes, cur = [], 0
    for s in steps:
        if s["via"] == "decode":
            cur += 1
        passes.append(cur)
    npass = cur + 1
    cols = npass * (L + 1)
    colw = max(8.0, min(28.0, 440.0 / max(cols, 1)))
    rowh = 26.0
    left = max(text_width(r, 9, bold=True) for r in rows) + 14
    top = 26.0
    panel_gap = 14.0
    shapes: list[Shape] = []

    def X(p: int, level: int) -> float:
        return left + p * ((L + 1) * colw + panel_gap) + level * colw + colw / 2

    def Y(domain: str) -> float:
        return top + rows.index(domain) * rowh + rowh / 2

    for p in range(npass):
        x0 = left + p * ((L + 1) * colw + panel_gap)
        shapes.append(Rect(x0, top, (L + 1) * colw, len(rows) * rowh, fill="#f6f8fa", stroke=GRID, width=0.6))
        shapes.append(Label(x0, top - 14, "forward pass" if npass == 1 else f"pass {p + 1}", 8, MUTED, bold=True))
        step = max(1, math.ceil((L + 1) * 14 / ((L + 1) * colw)))
        for level in range(0, L + 1, step):
            shapes.append(Label(X(p, level), top - 3, str(level), 7, MUTED, anchor="middle"))
    for r in rows:
        shapes.append(Label(left - 6, Y(r) + 3, r, 9, INK, anchor="end", bold=True))
        for p in range(npass):
            shapes.append(Line(X(p, 0), Y(r), X(p, L), Y(r), GRID, 0.6, dash=True))
    prev = None
    for s, p in zip(steps, passes):
        x, y = X(p, s["level"]), Y(s["domain"])
        if prev is not None:
            (pd, pl, pp) = prev
            if s["via"] == "decode":
                shapes.extend(_arrow(X(pp, pl), Y(pd), x - 4, y, WITNESS, 1.3, dash=True))
            else:
                # residual: stay in the previous domain until the layer before, then attend.
                mid = X(pp, max(pl, s["level"] - 1))
                if mid > X(pp, pl):
                    shapes.append(Line(X(pp, pl), Y(pd), mid, Y(pd), WITNESS, 1.6))
                shapes.extend(_arrow(mid, Y(pd), x - 3 if x > mid else x, y, WITNESS, 1.6))
        shapes.append(Rect(x - 3.5, y - 3.5, 7, 7, fill=WITNESS, stroke="#ffffff", width=0.6))
        prev = (s["domain"], s["level"], p)
    h = top + len(rows) * rowh + 20
    legend = "x: level (layer boundary), y: domain; solid: attention or residual; dashed: decode feedback"
    shapes.append(Label(left, h - 6, legend, 7.5, MUTED))
    w = max(left + npass * ((L + 1) * colw + panel_gap), left + text_width(legend, 7.5) + 8)
    return Drawing(w, h, tuple(shapes), "Witness path", path["text"])


def draw_leak_bars(guarded: float | None, dense: float | None) -> Drawing:
    """Leakage rate of the guarded model next to the same model without masks."""
    shapes: list[Shape] = []
    bar_w, left, top = 300.0, 120.0, 10.0
    alt = []
    for i, (name, v, color) in enumerate((("guarded model", guarded, COLOR["PROVED"] if guarded == 0 else WITNESS),
                                          ("dense model", dense, "#8c959f"))):
        y = top + i * 26
        shapes.append(Label(left - 8, y + 12, name, 9, INK, anchor="end", bold=True))
        shapes.append(Rect(left, y, bar_w, 16, fill="#f6f8fa", stroke=GRID, width=0.6))
        if v is None:
            shapes.append(Label(left + 6, y + 12, "not measured", 8.5, MUTED))
            alt.append(f"{name}: not measured")
            continue
        shapes.append(Rect(left, y, bar_w * max(0.0, min(1.0, v)), 16, fill=color))
        shapes.append(Label(left + bar_w + 6, y + 12, f"{v:.4g}", 9, INK, mono=True))
        alt.append(f"{name}: leakage rate {v:.4g}")
    return Drawing(left + bar_w + 70, top + 56, tuple(shapes), "Cross-domain leakage rate", "\n".join(alt))


# =============================================================================================
# 4. Document: report data → blocks
# =============================================================================================
@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Para:
    text: str
    kind: str = "p"  # p | note | warn | small


@dataclass(frozen=True)
class Badge:
    status: str  # PROVED | REFUTED | UNKNOWN (or any short word; colour only for the three)


@dataclass(frozen=True)
class Mono:
    text: str


Cell = Union[str, Badge, Mono]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    widths: tuple[float, ...] | None = None  # relative column widths


@dataclass(frozen=True)
class Figure:
    drawing: Drawing
    caption: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Banner:
    status: str
    title: str
    lines: tuple[str, ...]


Block = Union[Heading, Para, Table, Figure, Bullets, Banner]


def _fmt(v: Any) -> str:
    """A JSON value as short readable text: lists comma-separated, objects as "key: value" pairs."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) if not isinstance(x, (dict, list)) else f"({_fmt(x)})" for x in v) if v else "none"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in sorted(v.items())) if v else "none"
    return str(v)


def _kv(d: dict | None) -> Table:
    rows = tuple((str(k), _fmt(v)) for k, v in sorted((d or {}).items()))
    return Table(("field", "value"), rows or (("-", "none recorded"),), (1, 3))


def _generic(value: Any) -> list[Block]:
    """Any JSON record as blocks: scalars as field/value rows, lists of objects as tables, lists of text as bullets."""
    if not isinstance(value, dict):
        return [Para(_fmt(value))]
    rows, out = {}, []
    later: list[Block] = []
    for k, v in sorted(value.items()):
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = sorted({c for x in v for c in x})
            later.append(Para(f"{k} ({len(v)})", "small"))
            later.append(Table(tuple(cols), tuple(tuple(_fmt(x.get(c)) for c in cols) for x in v)))
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            later.append(Para(f"{k}:", "small"))
            later.append(Bullets(tuple(v)))
        else:
            rows[k] = v
    if rows:
        out.append(_kv(rows))
    return out + later


def _audit_blocks(audit: dict) -> list[Block]:
    out: list[Block] = []
    findings = [f for f in audit.get("findings") or [] if isinstance(f, dict)]
    clean = audit.get("clean")
    if clean is True and not findings:
        out.append(Para("No operation other than guarded attention mixes sequence positions in the traced model.", "p"))
    elif findings:
        out.append(Para(f"{len(findings)} operation(s) mix sequence positions outside guarded attention; "
                        "certification refuses such models:", "warn"))
        out.append(Table(("module", "op", "kind", "why"),
                         tuple((Mono(str(f.get("module") or "<root>")), Mono(str(f.get("op"))), str(f.get("kind", "-")),
                                str(f.get("message", "")) + (f" ({f['source']})" if f.get("source") else ""))
                               for f in findings), (2, 2, 1, 4)))
    out.extend(_generic({k: v for k, v in audit.items() if k != "findings"}))
    return out


def _leak_blocks(record: dict) -> list[Block]:
    sides = [k for k in ("guarded", "dense") if isinstance(record.get(k), dict)]
    if not sides:
        return _generic(record)
    keys = [k for k in ("trials", "leaks", "rate", "outputs", "seed", "seconds", "model")
            if any(k in record[s] for s in sides)]
    out: list[Block] = [Table(("",) + tuple(f"{s} model" for s in sides),
                              tuple((k,) + tuple(_fmt(record[s].get(k)) for s in sides) for k in keys))]
    for part, label in (("by_poison", "poison"), ("by_source", "forbidden source")):
        names = sorted({n for s in sides for n in (record[s].get(part) or {})})
        if names:
            def cell(s, n):
                x = (record[s].get(part) or {}).get(n) or {}
                return f"{x.get('leaks', '-')} of {x.get('trials', '-')} trials leak"
            out.append(Table((label,) + tuple(f"{s} model" for s in sides),
                             tuple((n,) + tuple(cell(s, n) for s in sides) for n in names)))
    rest = {k: v for k, v in record.items() if k not in sides}
    if rest:
        out.extend(_generic(rest))
    return out


def _scope_text(scope: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted((scope or {}).items())) or "-"


def _method_text(m: dict) -> str:
    parts = [str(m.get("name", "?"))]
    if m.get("version"):
        parts.append(str(m["version"]))
    if m.get("seconds") is not None:
        parts.append(f"{float(m['seconds']):.3g} s")
    return " ".join(parts)


def _rule_text(rule: Any) -> str:
    """A forbid rule as the policy writes it, e.g. ``flow: {from: toxicology, to: answer}``."""
    if isinstance(rule, dict):
        if isinstance(rule.get("flow"), dict):
            return f"flow: {{from: {rule['flow'].get('from')}, to: {rule['flow'].get('to')}}}"
        for kind in ("combine", "isolate"):
            if isinstance(rule.get(kind), list):
                return f"{kind}: [{', '.join(map(str, rule[kind]))}]"
    return _fmt(rule)


def _rederived(c: dict) -> Cell:
    r = c.get("rechecked")
    if r is None:
        return "-"
    if r == c["status"]:
        return "agrees"
    return Badge(r) if _combine([c["status"], r]) != c["status"] else "stronger"


def _witness_cells(data: dict) -> dict[int, set[tuple[int, int]]]:
    """layer → {(reader id, source id)} of attention edges used by witness paths of refuted rules."""
    ids = {d["name"]: d["id"] for d in data["domains"]}
    out: dict[int, set[tuple[int, int]]] = {}
    for c in data["rules"]:
        if c["status"] != "REFUTED":
            continue
        for w in c["witness"]:
            steps = w["steps"]
            for a, b in zip(steps, steps[1:]):
                if b["via"] == "attention" and a["domain"] in ids and b["domain"] in ids and b["level"] >= 1:
                    out.setdefault(b["level"] - 1, set()).add((ids[b["domain"]], ids[a["domain"]]))
    return out


def document(data: dict) -> list[Block]:
    """Lay the report data out as blocks, verdict first."""
    v = data["verdict"]
    sysd = data["system"]
    scope = sysd["scope"] or {}
    B: list[Block] = [Heading(1, data["title"], "top")]

    # --- verdict first -----------------------------------------------------------------------
    counts = v["counts"]
    lines = [f"Claims: {counts['PROVED']} proved, {counts['REFUTED']} refuted, {counts['UNKNOWN']} unknown. "
             f"Certificate verdict: {v['certificate']}."]
    lines += v["reasons"]
    sig = data["integrity"]["signature"]
    lines.append({"intact": f"Signature: intact under its embedded key {sig.get('key_id')}; compare this key id with "
                            "the signer's published key to establish who signed.",
                  "absent": "Signature: absent (unsigned).",
                  "invalid": "Signature: INVALID — the directory changed after signing."}[sig["status"]])
    meaning = {"PROVED": "Every claim in the certificate was proved for the stated scope.",
               "REFUTED": "At least one forbidden information path exists; see the witness paths below.",
               "UNKNOWN": "Not certified: at least one claim could not be established. UNKNOWN is never a pass."}
    B.append(Heading(2, "Verdict", "verdict"))
    B.append(Banner(v["shown"], meaning[v["shown"]], tuple(lines)))
    if data["findings"]:
        B.append(Table(("finding", "severity", "message"),
                       tuple((Mono(str(f.get("code"))), str(f.get("severity")), str(f.get("message")))
                             for f in data["findings"]), (1, 1, 6)))
    bad_files = [r for r in data["integrity"]["files"] if r["status"] != "match"]
    if bad_files:
        B.append(Para("Integrity: " + "; ".join(f"{r['item']}: {r['status']}" for r in bad_files), "warn"))

    # --- what the system is ------------------------------------------------------------------
    B.append(Heading(2, "The system and its deployment profile", "system"))
    pol = sysd["policy"]
    B.append(Para(f"Policy “{pol.get('name') or '-'}”" + (f": {pol['description']}" if pol.get("description") else ".")))
    facts = {
        "policy file": pol.get("file"),
        "model layers in scope": scope.get("layers"),
        "deployment profile": sysd["profile"]["name"] or "base policy (no profile)",
        "generation domain": sysd.get("generation"),
        "position ids": sysd.get("positions"),
        "block size": scope.get("block_size"),
        "max sequence length": scope.get("max_seq_len"),
    }
    for part in ("model", "weights"):
        if isinstance(sysd.get(part), dict):
            for k, val in sorted(sysd[part].items()):
                if k != "files":
                    facts[f"{part} {k}"] = val
    B.append(Table(("property", "value"), tuple((k, _fmt(val)) for k, val in facts.items()), (2, 5)))
    if sysd["profile"]["definition"]:
        prof = sysd["profile"]["definition"]
        B.append(Para(f"Profile “{sysd['profile']['name']}” replaces the sources of the readers it lists"
                      + (f" ({prof['description']})" if prof.get("description") else "") + ":"))
        B.append(Table(("reader", "may read (under this profile)"),
                       tuple((r, _fmt(s)) for r, s in sorted((prof.get("reads") or {}).items())), (1, 3)))
    if sysd["reads"]:
        B.append(Para("Base policy: who may read whom (a domain also reads itself unless it says self: false; "
                      "a rule on a domain covers its descendants).", "small"))
        B.append(Table(("reader", "sources"), tuple((r, _fmt(s)) for r, s in sorted(sysd["reads"].items())), (1, 3)))
    if sysd["layer_overrides"]:
        B.append(Table(("layers", "reads override"),
                       tuple((str(o.get("layers")), _fmt(o.get("reads"))) for o in sysd["layer_overrides"]), (1, 4)))
    if sysd["patterns"]:
        B.append(Table(("domain", "sparsity pattern (only removes pairs)"),
                       tuple((k, _fmt(p)) for k, p in sorted(sysd["patterns"].items())), (1, 4)))

    # --- domains, relations, block map -------------------------------------------------------
    B.append(Heading(2, "Domain tree and per-layer relations", "domains"))
    if data["domains"]:
        forbidden: dict[str, list[str]] = {}
        for c in data["rules"]:
            flow = (c.get("rule") or {}).get("flow")
            if isinstance(flow, dict):
                forbidden.setdefault(str(flow.get("from")), []).append(f"→ {flow.get('to')}")
        B.append(Figure(draw_domain_tree(data["domains"], forbidden), "Domains in pre-order (a subtree is a "
                        "contiguous id range). Blue outline: the domain of generated tokens."))
        if len(data["domains"]) > _TREE_MAX:
            B.append(Para("Domain list (id name): " + " · ".join(f"{d['id']} {d['name']}" for d in data["domains"]),
                          "small"))
        names = [d["name"] for d in data["domains"]]
        cells = _witness_cells(data)
        groups = data["relations"]
        if len(groups) > _RELATION_FIGURES:
            B.append(Para(f"{len(groups)} distinct per-layer relations; the first {_RELATION_FIGURES} are drawn, "
                          "all are in the JSON report.", "note"))
        for g in groups[:_RELATION_FIGURES]:
            wc = set().union(*(cells.get(l, set()) for l in g["layers"])) if cells else set()
            title = f"Relation at layer{'s' if len(g['layers']) > 1 else ''} {_ranges(g['layers'])}"
            B.append(Figure(draw_matrix(names, g["matrix"], title, wc),
                            title + ": a dark cell lets tokens of the row's domain attend tokens of the column's."))
    else:
        B.append(Para("Domain pictures are not available for this directory.", "note"))
    bm = data["blockmap"]
    if bm:
        B.append(Heading(3, "Example block map", "blockmap"))
        B.append(Para(bm["note"], "small"))
        for m in bm["maps"]:
            title = f"Block map at layer {m['layer']}" + (f" ({m['layer_note']})" if m.get("layer_note") else "")
            B.append(Figure(draw_blockmap(m["kinds"], bm["segments"], bm["block"], title),
                            f"{title}: {m['tiles']['empty']} of {m['tiles']['total']} tiles are EMPTY and never loaded."))
    for n in data["notes"]:
        B.append(Para(n, "note"))

    # --- forbid rules --------------------------------------------------------------------------
    B.append(Heading(2, "Forbid rules", "rules"))
    if not data["rules"]:
        B.append(Para("The policy states no forbid rules: nothing about information flow is claimed.", "warn"))
    for c in data["rules"]:
        loc = c["location"]
        where = f"{loc.get('file')}:{loc.get('line')}:{loc.get('column')}" if loc else "-"
        B.append(Heading(3, f"{c['id']} — {c['statement']}", "rule-" + re.sub(r"[^a-z0-9]+", "-", c["id"].lower())))
        rows = [("verdict", Badge(c["status"])), ("re-derived now", _rederived(c)), ("rule", Mono(_rule_text(c.get("rule")))),
                ("method", _method_text(c["method"])),
                ("scope", _scope_text(c["scope"])), ("policy location", Mono(where))]
        if c.get("reason"):
            rows.append(("reason", c["reason"]))
        ub = c.get("unbounded")
        if isinstance(ub, dict) and ub.get("status"):
            rows.append(("for any depth", Badge(_status(ub["status"]))))
        B.append(Table(("", ""), tuple(rows), (1, 4)))
        if c["status"] == "REFUTED":
            for w in c["witness"]:
                B.append(Figure(draw_witness(w, scope.get("layers")), f"Witness: {w['text']}"))
        elif c["status"] == "UNKNOWN":
            B.append(Para(f"UNKNOWN — not established, not a pass: {c.get('reason') or 'no reason recorded'}.", "warn"))

    B.append(Heading(2, "Every claim", "claims"))
    B.append(Para("“Re-derived” compares the claim with what this report obtained by verifying the directory's "
                  "policy again (graph search and Z3): “agrees”, a weaker status (which then counts), or “stronger” "
                  "(not counted: only a new certificate can claim more); “-” where a claim concerns a model.",
                  "small"))
    B.append(Table(("claim", "statement", "verdict", "re-derived", "method", "scope"),
                   tuple((Mono(c["id"]), c["statement"], Badge(c["status"]), _rederived(c), _method_text(c["method"]),
                          _scope_text(c["scope"])) for c in data["claims"])
                   or (("-", "no claims", Badge("UNKNOWN"), "-", "-", "-"),),
                   (1.2, 3.6, 1.1, 1.1, 1.5, 1.8)))

    # --- explanations --------------------------------------------------------------------------
    B.append(Heading(2, "Z3 explanations", "explanations"))
    n_exp = 0
    for c in data["claims"]:
        exp = c.get("explanation")
        if isinstance(exp, dict):
            n_exp += 1
            rows = [("explanation", Badge(_status(exp.get("status"))))]
            if exp.get("method"):
                rows.append(("method", _method_text(exp["method"])))
            if exp.get("relies_on"):
                lines_ = exp.get("lines") or {}
                rows.append(("leak relies on", ", ".join(f"{e}" + (f" (line {lines_[e]})" if e in lines_ else "")
                                                         for e in exp["relies_on"])))
            if exp.get("drop_one_of") is not None:
                rows.append(("dropping any one restores the rule", ", ".join(exp["drop_one_of"]) or "none"))
            if exp.get("text"):
                rows.append(("summary", exp["text"]))
            if exp.get("reason"):
                rows.append(("reason", exp["reason"]))
            B.append(Para(f"{c['id']}: {c['statement']}", "small"))
            B.append(Table(("", ""), tuple(rows), (1, 3)))
        elif c["method"].get("name") == "z3":
            n_exp += 1
            rows = [("verdict", Badge(c["status"])), ("method", _method_text(c["method"]))]
            if c.get("reason"):
                rows.append(("reason", c["reason"]))
            for k, val in sorted(c["details"].items()):
                rows.append((k, _fmt(val) if val not in ([], {}) else "none"))
            B.append(Para(f"{c['id']}: {c['statement']}", "small"))
            B.append(Table(("", ""), tuple(rows), (1, 3)))
    if not n_exp:
        B.append(Para("No Z3 explanations were recorded.", "note"))

    # --- audit, leak test, sparsity ------------------------------------------------------------
    B.append(Heading(2, "Graph audit", "audit"))
    if data["audit"]:
        B.append(Para("Mask-level isolation holds only if attention is the only operation that mixes sequence "
                      "positions; the traced model's sequence-mixing operations are listed here.", "small"))
        B.extend(_audit_blocks(data["audit"]))
    else:
        B.append(Para("No graph audit is recorded: this directory certifies a compiled policy, not a model. "
                      "Isolation of a model additionally assumes attention is its only sequence-mixing operation.", "note"))

    B.append(Heading(2, "Leak test", "leak"))
    lt = data["leak_test"]
    if lt["record"]:
        B.append(Figure(draw_leak_bars(lt["guarded_rate"], lt["dense_rate"]),
                        "Cross-domain leakage: share of protected outputs that changed when forbidden domains were "
                        "poisoned (random, NaN, Inf). Guarded must be 0; dense shows the test can detect leakage."))
        B.extend(_leak_blocks(lt["record"]))
    else:
        B.append(Para("No empirical leak test is recorded.", "note"))

    B.append(Heading(2, "Sparsity and FLOPs saved", "sparsity"))
    sp = data["sparsity"]
    if sp["recorded"]:
        B.extend(_generic(sp["recorded"]))
    if sp["example"]:
        ex = sp["example"]
        B.append(Para(f"For the example layout ({ex['tokens']} tokens, {ex['block']}x{ex['block']} tiles): EMPTY tiles "
                      "are never loaded, so their share is the share of attention FLOPs (QK and PV) skipped.", "small"))
        B.append(Table(("layer", "empty", "partial", "full", "tiles", "FLOPs skipped"),
                       tuple((str(r["layer"]), str(r["empty"]), str(r["partial"]), str(r["full"]), str(r["total"]),
                              f"{100 * r['flops_saved']:.1f}%") for r in ex["layers"])))
    if not sp["recorded"] and not sp["example"]:
        B.append(Para("No sparsity figures are available.", "note"))

    # --- assumptions ---------------------------------------------------------------------------
    B.append(Heading(2, "Assumptions and threat model", "assumptions"))
    if data["assumptions"]:
        B.append(Para("Every claim above holds under these assumptions:", "small"))
        B.append(Bullets(tuple(data["assumptions"])))
    tm = {k: val for k, val in data["threat_model"].items() if k != "not_covered"}
    if tm:
        B.append(Table(("threat model", ""), tuple((k, _fmt(val)) for k, val in sorted(tm.items())), (1, 4)))
    B.append(Para("Not covered:", "small"))
    B.append(Bullets(tuple(data["not_covered"])))

    # --- digests and versions ------------------------------------------------------------------
    B.append(Heading(2, "Digests, signature and tool versions", "digests"))
    src = data["source"]
    B.append(Table(("item", "sha256"), (("certificate file (" + src["certificate"] + ")", Mono(src["certificate_sha256"])),
                                        ("canonical certificate (RFC 8785, without signature)", Mono(src["canonical_sha256"])))
                   + tuple((f"{k} ({'/'.join(str(x) for x in path)})", Mono(str(val)))
                           for k, path, val in _digest_rows(data["digests"])), (2, 3)))
    if data["integrity"]["files"]:
        B.append(Table(("re-checked", "status", "sha256 now"),
                       tuple((r["item"], Badge(r["status"]), Mono(r["actual"] or "-"))
                             for r in data["integrity"]["files"]), (2, 1, 3)))
    B.append(Para(f"Signature: {sig['status']}. {sig['detail'][:1].upper() + sig['detail'][1:]}.", "warn" if sig["status"] == "invalid" else "small"))
    B.append(Table(("tool", "version"), tuple((k, _fmt(val)) for k, val in sorted(data["tools"].items()))
                   + (("report generator", f"{data['generator']['name']} {data['generator']['version']}"),), (1, 2)))

    # --- compliance mapping --------------------------------------------------------------------
    B.append(Heading(2, "Mapping to EU AI Act, NIST AI RMF and ISO/IEC 42001", "compliance"))
    B.append(Para("Where in this report evidence for each item can be found. This is an index for reviewers, "
                  "not a conformity assessment or a claim of compliance.", "small"))
    B.append(Table(("report section", "EU AI Act Annex IV", "NIST AI RMF 1.0", "ISO/IEC 42001:2023 Annex A"),
                   tuple((c["title"], "; ".join(c["eu_ai_act_annex_iv"]), "; ".join(c["nist_ai_rmf"]),
                          "; ".join(c["iso_iec_42001"])) for c in data["compliance"]), (1.3, 2, 2, 1.7)))
    B.append(Para(data["compliance_note"], "small"))
    return B


def _digest_rows(subject: dict) -> list[tuple[str, tuple, str]]:
    """Every sha256-like value in the certificate's subject, with where it sits."""
    out = []

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, val in sorted(obj.items()):
                walk(val, path + (k,))
        elif isinstance(obj, str) and re.fullmatch(r"[0-9a-f]{64}", obj):
            out.append((path[0], path[1:] or ("sha256",), obj))

    walk(subject or {}, ())
    return out


# =============================================================================================
# 5a. HTML (self-contained: inline CSS and SVG, no scripts, no external resources)
# =============================================================================================
def _e(s: Any) -> str:
    return _html.escape(str(s), quote=True)


def _n(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _png(width: int, height: int, rgb: bytes) -> bytes:
    """A minimal 8-bit RGB PNG (no filtering) of ``rgb``."""
    raw = b"".join(b"\x00" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def svg(d: Drawing, scale: float = 1.0) -> str:
    """A Drawing as an inline SVG element with title and text description, ``scale`` × its size in points."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_n(d.width)} {_n(d.height)}" '
             f'width="{_n(d.width * scale)}" height="{_n(d.height * scale)}" role="img" aria-label="{_e(d.title)}">'
             f"<title>{_e(d.title)}</title><desc>{_e(d.alt)}</desc>"]
    for s in d.shapes:
        if isinstance(s, Rect):
            parts.append(f'<rect x="{_n(s.x)}" y="{_n(s.y)}" width="{_n(s.w)}" height="{_n(s.h)}" '
                         f'fill="{s.fill or "none"}" stroke="{s.stroke or "none"}" stroke-width="{_n(s.width)}"'
                         + (' stroke-dasharray="2 2"' if s.dash else "") + "/>")
        elif isinstance(s, Line):
            parts.append(f'<line x1="{_n(s.x1)}" y1="{_n(s.y1)}" x2="{_n(s.x2)}" y2="{_n(s.y2)}" stroke="{s.stroke}" '
                         f'stroke-width="{_n(s.width)}"' + (' stroke-dasharray="4 3"' if s.dash else "") + "/>")
        elif isinstance(s, Poly):
            pts = " ".join(f"{_n(x)},{_n(y)}" for x, y in s.points)
            tag = "polygon" if s.closed else "polyline"
            parts.append(f'<{tag} points="{pts}" fill="{s.fill or "none"}" stroke="{s.stroke or "none"}" '
                         f'stroke-width="{_n(s.width)}"' + (' stroke-dasharray="4 3"' if s.dash else "") + "/>")
        elif isinstance(s, Raster):
            uri = "data:image/png;base64," + base64.b64encode(_png(s.px_w, s.px_h, s.rgb)).decode()
            parts.append(f'<image x="{_n(s.x)}" y="{_n(s.y)}" width="{_n(s.w)}" height="{_n(s.h)}" '
                         f'preserveAspectRatio="none" style="image-rendering:pixelated" href="{uri}"/>')
        elif isinstance(s, Label):
            anchor = {"start": "start", "middle": "middle", "end": "end"}[s.anchor]
            fam = "Courier New, Courier, monospace" if s.mono else "Helvetica, Arial, Liberation Sans, sans-serif"
            rot = f' transform="rotate({_n(s.angle)} {_n(s.x)} {_n(s.y)})"' if s.angle else ""
            parts.append(f'<text x="{_n(s.x)}" y="{_n(s.y)}" font-size="{_n(s.size)}" fill="{s.fill}" '
                         f'text-anchor="{anchor}" font-family="{fam}"' + (' font-weight="bold"' if s.bold else "")
                         + f"{rot}>{_e(s.text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
:root{--ink:#1f2328;--muted:#59636e;--grid:#d1d9e0}
*{box-sizing:border-box}
body{font:14px/1.5 Helvetica,Arial,"Liberation Sans",sans-serif;color:var(--ink);margin:0;background:#fff}
main{max-width:1040px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:4px 0 14px}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--grid)}
h3{font-size:15px;margin:22px 0 8px}
.banner{border:3px solid;border-radius:8px;padding:16px 20px;margin:8px 0 12px}
.banner .status{font-size:34px;font-weight:bold;letter-spacing:1px}
.banner .what{font-size:16px;font-weight:bold;margin:2px 0 8px}
.banner ul{margin:6px 0 0 18px;padding:0}
table{border-collapse:collapse;width:100%;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid var(--grid);padding:4px 7px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f6f8fa}
code{font:12px/1.4 "Courier New",Courier,monospace}
.badge{display:inline-block;font-weight:bold;font-size:12px;padding:1px 7px;border-radius:10px;border:1px solid}
.note{color:var(--muted);font-style:italic}.small{color:var(--muted);font-size:13px}
.warn{background:#fff8c5;border-left:4px solid #9a6700;padding:6px 10px}
figure{margin:10px 0 16px;overflow-x:auto}figure svg{max-width:100%;height:auto}figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
nav{font-size:13px;color:var(--muted);margin-bottom:8px}nav a{color:#0969da;margin-right:10px;text-decoration:none}
@media print{main{max-width:none;padding:0}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""


def _cell_html(c: Cell) -> str:
    if isinstance(c, Badge):
        col = COLOR.get(c.status, MUTED)
        bg = TINT.get(c.status, "#f6f8fa")
        return f'<span class="badge" style="color:{col};border-color:{col};background:{bg}">{_e(c.status)}</span>'
    if isinstance(c, Mono):
        return f"<code>{_e(c.text)}</code>"
    return _e(c)


def to_html(data: dict) -> str:
    """The report as one self-contained HTML page."""
    blocks = document(data)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; img-src data:">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="domainguard {_e(data["generator"]["version"])}">',
           f"<title>{_e(data['title'])}</title><style>{_CSS}</style></head><body><main>"]
    toc = [(b.anchor, b.text) for b in blocks if isinstance(b, Heading) and b.level == 2]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f'<h{b.level} id="{_e(b.anchor)}">{_e(b.text)}</h{b.level}>' if b.anchor else
                       f"<h{b.level}>{_e(b.text)}</h{b.level}>")
            if b.level == 1:
                out.append("<nav>" + "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in toc) + "</nav>")
        elif isinstance(b, Banner):
            col, bg = COLOR[b.status], TINT[b.status]
            out.append(f'<section class="banner" id="verdict-banner" data-verdict="{_e(b.status)}" '
                       f'style="border-color:{col};background:{bg}"><div class="status" style="color:{col}">'
                       f"{_e(b.status)}</div><div class=\"what\">{_e(b.title)}</div><ul>"
                       + "".join(f"<li>{_e(x)}</li>" for x in b.lines) + "</ul></section>")
        elif isinstance(b, Para):
            cls = "" if b.kind == "p" else f' class="{b.kind}"'
            out.append(f"<p{cls}>{_e(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "" if not any(b.header) else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in b.header) + "</tr></thead>"
            cols = ""
            if b.widths:
                cols = "<colgroup>" + "".join(f'<col style="width:{_n(100 * w / sum(b.widths))}%">' for w in b.widths) + "</colgroup>"
            out.append(f"<table>{cols}{head}<tbody>" + "".join(
                "<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in b.rows)
                       + "</tbody></table>")
        elif isinstance(b, Figure):
            out.append(f"<figure>{svg(b.drawing, 1.45)}<figcaption>{_e(b.caption)}</figcaption></figure>")
    out.append(f'<p class="small">Generated by domainguard {_e(data["generator"]["version"])} from '
               f'{_e(data["source"]["certificate"])} (sha256 <code>{_e(data["source"]["certificate_sha256"])}</code>).</p>')
    out.append("</main></body></html>\n")
    return "\n".join(out)


# =============================================================================================
# 5b. Markdown (pictures as their text alternatives)
# =============================================================================================
def _md_escape(s: str) -> str:
    """Text as inert Markdown: one line, no markup, no raw HTML (policy text is the policy author's, and a
    renderer must not turn it into a heading, a quote, a link, a comment or a style)."""
    out = str(s).replace("\r", " ").replace("\n", " ")
    out = re.sub(r"([\\`*_\[\]{}()#+\-.!|>~])", r"\\\1", out)
    return out.replace("&", "&amp;").replace("<", "&lt;")


def _cell_md(c: Cell) -> str:
    if isinstance(c, Badge):
        return f"**{c.status}**"
    if isinstance(c, Mono):
        return "`" + str(c.text).replace("`", "'").replace("|", "\\|") + "`"
    return _md_escape(c)


def to_markdown(data: dict) -> str:
    out: list[str] = []
    for b in document(data):
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_escape(b.text))
        elif isinstance(b, Banner):
            out.append(f"> **Verdict: {b.status}** — {_md_escape(b.title)}\n>")
            out.extend(f"> - {_md_escape(x)}" for x in b.lines)
        elif isinstance(b, Para):
            text = _md_escape(b.text)
            out.append({"note": f"*{text}*", "warn": f"> **Note:** {text}"}.get(b.kind, text))
        elif isinstance(b, Bullets):
            out.extend(f"- {_md_escape(x)}" for x in b.items)
        elif isinstance(b, Table):
            header = [h or " " for h in b.header]
            out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(_cell_md(c) for c in row) + " |" for row in b.rows)
        elif isinstance(b, Figure):
            alt = str(b.drawing.alt).replace("`", "'")  # nothing in a picture's text can close its block
            out.append(f"*Figure: {_md_escape(b.caption)}*\n\n````text\n{alt}\n````")
        out.append("")
    return "\n".join(out)


# =============================================================================================
# 5c. PDF: a small writer of text, tables and vector drawings (standard fonts, no dependencies)
# =============================================================================================
_PAGE_W, _PAGE_H, _MARGIN = 595.28, 841.89, 48.0
_FONTS = {"reg": "F1", "bold": "F2", "mono": "F3"}


def _rgb(color: str) -> str:
    c = color.lstrip("#")
    return " ".join(_n(int(c[i:i + 2], 16) / 255) for i in (0, 2, 4))


def _pdf_str(text: str) -> str:
    raw = _pdf_safe(text).encode("cp1252", "replace")
    out = []
    for b in raw:
        if b in (0x28, 0x29, 0x5C):
            out.append("\\" + chr(b))
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "(" + "".join(out) + ")"


def _wrap(text: str, size: float, width: float, *, bold: bool = False, mono: bool = False) -> list[str]:
    """Greedy word wrap; words wider than the line are broken."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        cur = ""
        for word in para.split(" "):
            cand = f"{cur} {word}" if cur else word
            if text_width(cand, size, bold=bold, mono=mono) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            while text_width(word, size, bold=bold, mono=mono) > width and len(word) > 1:
                k = len(word)
                while k > 1 and text_width(word[:k], size, bold=bold, mono=mono) > width:
                    k -= 1
                lines.append(word[:k])
                word = word[k:]
            cur = word
        lines.append(cur)
    return lines


class _PdfWriter:
    """Pages of content streams; ``y`` is the distance from the top of the page to the cursor."""

    def __init__(self, title: str, footer: str):
        self.title, self.footer = title, footer
        self.pages: list[list[str]] = []
        self.outline: list[tuple[int, str, int, float]] = []  # (level, text, page index, y from top)
        self.images: list[tuple[int, Raster]] = []  # (page index, image); named /Im<k> by position
        self.new_page()

    # --- primitives ---------------------------------------------------------------------------
    def new_page(self) -> None:
        self.pages.append([])
        self.y = _MARGIN

    @property
    def ops(self) -> list[str]:
        return self.pages[-1]

    def room(self, h: float) -> None:
        if self.y + h > _PAGE_H - _MARGIN - 14 and self.y > _MARGIN + 1:
            self.new_page()

    def text(self, x: float, y_top: float, s: str, size: float, font: str = "reg", color: str = INK) -> None:
        self.ops.append(f"BT /{_FONTS[font]} {_n(size)} Tf {_rgb(color)} rg 1 0 0 1 {_n(x)} {_n(_PAGE_H - y_top)} Tm "
                        f"{_pdf_str(s)} Tj ET")

    def rect(self, x: float, y_top: float, w: float, h: float, fill: str | None = None, stroke: str | None = None,
             width: float = 0.6) -> None:
        op = []
        if fill:
            op.append(f"{_rgb(fill)} rg")
        if stroke:
            op.append(f"{_rgb(stroke)} RG {_n(width)} w")
        op.append(f"{_n(x)} {_n(_PAGE_H - y_top - h)} {_n(w)} {_n(h)} re {'B' if fill and stroke else 'f' if fill else 'S'}")
        self.ops.append(" ".join(op))

    # --- flow blocks --------------------------------------------------------------------------
    def paragraph(self, text: str, size: float = 10, font: str = "reg", color: str = INK, indent: float = 0,
                  leading: float | None = None, bg: str | None = None) -> None:
        leading = leading or size * 1.35
        width = _PAGE_W - 2 * _MARGIN - indent - (12 if bg else 0)
        for line in _wrap(text, size, width, bold=font == "bold", mono=font == "mono"):
            self.room(leading)
            if bg:
                self.rect(_MARGIN + indent, self.y, _PAGE_W - 2 * _MARGIN - indent, leading, fill=bg)
            self.text(_MARGIN + indent + (6 if bg else 0), self.y + size, line, size, font, color)
            self.y += leading
        self.y += size * 0.45

    def heading(self, level: int, text: str) -> None:
        size = {1: 19, 2: 14, 3: 11}.get(level, 11)
        self.room(size * 3.2 + (0 if level == 1 else 110))  # keep a heading with what follows it
        self.y += size * (0.5 if level == 1 else 0.9)
        self.outline.append((level, _pdf_safe(text), len(self.pages) - 1, self.y))
        for line in _wrap(text, size, _PAGE_W - 2 * _MARGIN, bold=True):
            self.text(_MARGIN, self.y + size, line, size, "bold")
            self.y += size * 1.3
        if level == 2:
            self.ops.append(f"{_rgb(GRID)} RG 0.8 w {_n(_MARGIN)} {_n(_PAGE_H - self.y)} m "
                            f"{_n(_PAGE_W - _MARGIN)} {_n(_PAGE_H - self.y)} l S")
        self.y += 5

    def banner(self, b: Banner) -> None:
        width = _PAGE_W - 2 * _MARGIN - 24
        lines = [(ln, 9.5) for item in b.lines for ln in _wrap("- " + item, 9.5, width)]
        title_lines = _wrap(b.title, 11, width, bold=True)
        h = 16 + 30 + 14 * len(title_lines) + 12.5 * len(lines) + 6
        self.room(min(h, 300))
        top = self.y
        self.rect(_MARGIN, top, _PAGE_W - 2 * _MARGIN, h, fill=TINT[b.status], stroke=COLOR[b.status], width=2.5)
        self.text(_MARGIN + 12, top + 34, b.status, 26, "bold", COLOR[b.status])
        y = top + 52
        for t in title_lines:
            self.text(_MARGIN + 12, y, t, 11, "bold")
            y += 14
        y += 2
        for ln, size in lines:
            self.text(_MARGIN + 12, y, ln, size)
            y += 12.5
        self.y = top + h + 10

    def table(self, t: Table) -> None:
        ncol = len(t.header)
        total = _PAGE_W - 2 * _MARGIN
        rel = t.widths or tuple(1.0 for _ in range(ncol))
        widths = [total * r / sum(rel) for r in rel]
        size, mono_size, pad, lead = 8.5, 7.5, 3.5, 10.5

        def layout(cells) -> tuple[list[list[str]], float, list[str]]:
            wrapped, fonts = [], []
            for c, w in zip(cells, widths):
                font = "mono" if isinstance(c, Mono) else "bold" if isinstance(c, Badge) else "reg"
                text = c.text if isinstance(c, Mono) else c.status if isinstance(c, Badge) else str(c)
                wrapped.append(_wrap(text, mono_size if font == "mono" else size, w - 2 * pad,
                                     bold=font == "bold", mono=font == "mono"))
                fonts.append(font)
            return wrapped, max(len(x) for x in wrapped) * lead + 2 * pad - 2, fonts

        def draw_row(cells, header: bool) -> None:
            wrapped, h, fonts = layout(cells)
            self.room(h)
            x = _MARGIN
            for k, (lines, w) in enumerate(zip(wrapped, widths)):
                cell = cells[k]
                fill = "#f6f8fa" if header else (TINT.get(cell.status) if isinstance(cell, Badge) else None)
                self.rect(x, self.y, w, h, fill=fill, stroke=GRID, width=0.5)
                color = COLOR.get(cell.status, INK) if isinstance(cell, Badge) else INK
                font = "bold" if header else fonts[k]
                for i, ln in enumerate(lines):
                    self.text(x + pad, self.y + pad + size + i * lead - 1, ln, mono_size if font == "mono" else size,
                              font, color)
                x += w
            self.y += h

        has_header = any(t.header)
        whole = sum(layout(r)[1] for r in t.rows) + (layout(t.header)[1] if has_header else 0)
        if whole < 240:
            self.room(whole)  # a short table is never split
        if has_header:
            self.room(40)
            draw_row(t.header, True)
        for row in t.rows:
            before = len(self.pages)
            _, h, _ = layout(row)
            self.room(h)
            if has_header and len(self.pages) != before:
                draw_row(t.header, True)  # repeat the header on a new page
            draw_row(row, False)
        self.y += 8

    def figure(self, f: Figure) -> None:
        d = f.drawing
        avail = _PAGE_W - 2 * _MARGIN
        s = min(1.0, avail / d.width, (_PAGE_H - 2 * _MARGIN - 60) / d.height)
        self.room(d.height * s + 30)
        x0, top = _MARGIN, self.y
        self.ops.append(f"q 1 0 0 1 {_n(x0)} {_n(_PAGE_H - top)} cm {_n(s)} 0 0 {_n(-s)} 0 0 cm")
        for sh in d.shapes:
            if isinstance(sh, Raster):
                # Image space has its first row at the top of the unit square: map it the right way up.
                self.images.append((len(self.pages) - 1, sh))
                self.ops.append(f"q {_n(sh.w)} 0 0 {_n(-sh.h)} {_n(sh.x)} {_n(sh.y + sh.h)} cm "
                                f"/Im{len(self.images)} Do Q")
            else:
                self.ops.append(_pdf_shape(sh))
        self.ops.append("Q")
        self.y = top + d.height * s + 4
        self.paragraph(f.caption, 8.5, color=MUTED)

    # --- file ---------------------------------------------------------------------------------
    def render(self) -> bytes:
        n_pages = len(self.pages)
        objs: list[bytes] = []  # object i+1

        def add(body: bytes) -> int:
            objs.append(body)
            return len(objs)

        catalog = add(b"")  # filled later
        pages_id = add(b"")
        fonts = {
            "F1": add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"),
            "F2": add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>"),
            "F3": add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding /WinAnsiEncoding >>"),
        }
        font_dict = " ".join(f"/{k} {v} 0 R" for k, v in fonts.items())
        image_ids = []
        for _, im in self.images:
            data = zlib.compress(im.rgb, 9)
            image_ids.append(add(
                f"<< /Type /XObject /Subtype /Image /Width {im.px_w} /Height {im.px_h} /ColorSpace /DeviceRGB "
                f"/BitsPerComponent 8 /Interpolate false /Filter /FlateDecode /Length {len(data)} >>\nstream\n".encode()
                + data + b"\nendstream"))
        page_ids = []
        for i, ops in enumerate(self.pages):
            foot = f"{self.footer} - page {i + 1} of {n_pages}"
            ops = ops + [f"BT /F1 7.5 Tf {_rgb(MUTED)} rg 1 0 0 1 {_n(_MARGIN)} {_n(_MARGIN * 0.55)} Tm {_pdf_str(foot)} Tj ET"]
            stream = zlib.compress("\n".join(ops).encode("latin-1"), 9)
            content = add(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
            xobjects = " ".join(f"/Im{k + 1} {image_ids[k]} 0 R" for k, (pg, _) in enumerate(self.images) if pg == i)
            xobjects = f" /XObject << {xobjects} >>" if xobjects else ""
            page_ids.append(add(
                f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {_n(_PAGE_W)} {_n(_PAGE_H)}] "
                f"/Resources << /Font << {font_dict} >>{xobjects} >> /Contents {content} 0 R >>".encode()))
        objs[pages_id - 1] = (f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] "
                              f"/Count {n_pages} >>").encode()
        outline_ref = ""
        entries = [(lvl, t, p, y) for lvl, t, p, y in self.outline if lvl <= 2]
        if entries:
            root_id = add(b"")
            ids = [add(b"") for _ in entries]
            for k, ((lvl, t, p, y), oid) in enumerate(zip(entries, ids)):
                nav = []
                if k > 0:
                    nav.append(f"/Prev {ids[k - 1]} 0 R")
                if k + 1 < len(ids):
                    nav.append(f"/Next {ids[k + 1]} 0 R")
                objs[oid - 1] = (f"<< /Title {_pdf_str(t)} /Parent {root_id} 0 R {' '.join(nav)} "
                                 f"/Dest [{page_ids[p]} 0 R /XYZ 0 {_n(_PAGE_H - y + 20)} 0] >>").encode("latin-1")
            objs[root_id - 1] = f"<< /Type /Outlines /First {ids[0]} 0 R /Last {ids[-1]} 0 R /Count {len(ids)} >>".encode()
            outline_ref = f" /Outlines {root_id} 0 R /PageMode /UseOutlines"
        objs[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R{outline_ref} >>".encode()
        info = add(f"<< /Title {_pdf_str(self.title)} /Producer (domainguard) /Creator (domainguard report) >>".encode("latin-1"))
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for i, body in enumerate(objs):
            offsets.append(len(out))
            out += f"{i + 1} 0 obj\n".encode() + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
        out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
        ident = hashlib.md5(bytes(out)).hexdigest()  # a deterministic file identifier, not a security digest
        out += (f"trailer\n<< /Size {len(objs) + 1} /Root {catalog} 0 R /Info {info} 0 R "
                f"/ID [<{ident}> <{ident}>] >>\nstartxref\n{xref}\n%%EOF\n").encode()
        return bytes(out)


def _pdf_shape(s: Shape) -> str:
    """One drawing shape as PDF operators, in the figure's y-down coordinate system."""
    dash = "[3 2] 0 d " if getattr(s, "dash", False) else "[] 0 d "
    if isinstance(s, Rect):
        op = []
        if s.fill:
            op.append(f"{_rgb(s.fill)} rg")
        if s.stroke:
            op.append(f"{_rgb(s.stroke)} RG {_n(s.width)} w {dash}")
        paint = "B" if s.fill and s.stroke else "f" if s.fill else "S" if s.stroke else "n"
        return " ".join(op) + f" {_n(s.x)} {_n(s.y)} {_n(s.w)} {_n(s.h)} re {paint}"
    if isinstance(s, Line):
        return f"{_rgb(s.stroke)} RG {_n(s.width)} w {dash}{_n(s.x1)} {_n(s.y1)} m {_n(s.x2)} {_n(s.y2)} l S"
    if isinstance(s, Poly):
        path = " ".join(f"{_n(x)} {_n(y)} {'m' if i == 0 else 'l'}" for i, (x, y) in enumerate(s.points))
        op = []
        if s.fill:
            op.append(f"{_rgb(s.fill)} rg")
        if s.stroke:
            op.append(f"{_rgb(s.stroke)} RG {_n(s.width)} w {dash}")
        close = " h" if s.closed else ""
        paint = "B" if s.fill and s.stroke else "f" if s.fill else "S"
        return " ".join(op) + f" {path}{close} {paint}"
    assert isinstance(s, Label), f"unknown shape {type(s).__name__}"
    font = "F3" if s.mono else "F2" if s.bold else "F1"
    w = text_width(s.text, s.size, bold=s.bold, mono=s.mono)
    shift = {"start": 0.0, "middle": w / 2, "end": w}[s.anchor]
    a = math.radians(s.angle)
    c, si = math.cos(a), math.sin(a)
    x, y = s.x - shift * c, s.y - shift * si
    # Un-flip the glyphs inside the y-down figure space; rotate clockwise by `angle` on the page.
    return (f"BT /{font} {_n(s.size)} Tf {_rgb(s.fill)} rg {_n(c)} {_n(si)} {_n(si)} {_n(-c)} {_n(x)} {_n(y)} Tm "
            f"{_pdf_str(s.text)} Tj ET")


def to_pdf(data: dict) -> bytes:
    """The report as a PDF (A4), produced without a browser or any third-party library."""
    w = _PdfWriter(data["title"], f"{data['title']} - certificate sha256 {data['source']['certificate_sha256'][:16]}")
    for b in document(data):
        if isinstance(b, Heading):
            w.heading(b.level, b.text)
        elif isinstance(b, Banner):
            w.banner(b)
        elif isinstance(b, Para):
            style = {"p": (10, INK, None), "note": (9.5, MUTED, None), "warn": (9.5, INK, TINT["UNKNOWN"]),
                     "small": (9, MUTED, None)}[b.kind]
            w.paragraph(b.text, style[0], color=style[1], bg=style[2])
        elif isinstance(b, Bullets):
            for item in b.items:
                w.paragraph("- " + item, 9.5, indent=8)
        elif isinstance(b, Table):
            w.table(b)
        elif isinstance(b, Figure):
            w.figure(b)
    return w.render()


# =============================================================================================
# 6. Public entry points
# =============================================================================================
def render(path: str | Path, fmt: str = "html") -> Union[str, bytes]:
    """The report for a compiled directory or bundle: str for html/md/json/sarif, bytes for pdf."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise BundleError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}", code="DG432")
    src = _load(path)
    data = _build(src)
    if fmt == "sarif":
        from .sarif import dumps

        return dumps(src.cert, srcroot=str(Path.cwd()), shown=data["verdict"])
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if fmt == "html":
        return to_html(data)
    if fmt == "md":
        return to_markdown(data)
    return to_pdf(data)


def write_report(path: str | Path, fmt: str | None, out: str | Path) -> None:
    """Render and write atomically to ``out`` (a file); ``fmt=None`` takes the format from its suffix."""
    target = Path(out)
    by_suffix = _SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        fmt = by_suffix or target.suffix.lower().lstrip(".")
    elif by_suffix and by_suffix != fmt.lower():
        raise BundleError(f"--format {fmt} but the output file's name ends in {target.suffix}", code="DG432",
                          location=Location(str(target)), hint=f"Name it *.{fmt.lower()} or drop --format.")
    source = Path(path)
    root = (source if source.is_dir() else source.parent).resolve()
    if root == target.resolve() or root in target.resolve().parents:
        raise BundleError("the report would be written inside the directory it reports on, which changes what was "
                          "certified (an added or replaced file fails `domainguard verify`)", code="DG434",
                          location=Location(str(target)), hint="Write it beside the directory, e.g. -o report.html.")
    save(target, render(path, fmt))


def save(target: str | Path, data: Union[str, bytes]) -> None:
    """Write a rendered report to ``target`` atomically (a new temporary file, then a rename)."""
    from .artifact import replace_file

    target = Path(target)
    try:
        replace_file(target, data if isinstance(data, bytes) else data.encode("utf-8"))
    except OSError as exc:
        raise BundleError(f"cannot write the report ({exc.strerror or exc})", code="DG433",
                          location=Location(str(target))) from None
