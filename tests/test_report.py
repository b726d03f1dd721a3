"""The audit report: content, honesty (never more than the certificate), schema, determinism, errors."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domainguard import report
from domainguard.errors import BundleError
from test_report_fixtures import (
    PROVED_POLICY,
    REFUTED_POLICY,
    add_model_evidence,
    compile_dir,
    decode_png,
    edit_certificate,
    forge_proved,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proved(tmp_path):
    return compile_dir(tmp_path, PROVED_POLICY, name="proved")


@pytest.fixture
def refuted(tmp_path):
    return compile_dir(tmp_path, REFUTED_POLICY, name="refuted")


def _validate(data: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(report.REPORT_SCHEMA)
    jsonschema.validate(data, report.REPORT_SCHEMA, cls=jsonschema.Draft202012Validator)


def _banner(html: str) -> str:
    m = re.search(r'<section class="banner" id="verdict-banner" data-verdict="(\w+)"', html)
    assert m, "no verdict banner"
    return m.group(1)


# --- content ---------------------------------------------------------------------------------
def test_proved_directory_reports_proved_and_validates(proved):
    data = report.build(proved)
    _validate(data)
    assert data["verdict"] == {**data["verdict"], "certificate": "PROVED", "shown": "PROVED", "reasons": []}
    assert data["integrity"]["ok"] and {r["status"] for r in data["integrity"]["files"]} == {"match"}
    assert [d["name"] for d in data["domains"]] == ["instructions", "records", "medicine", "pharmacology", "dosing",
                                                    "toxicology", "answer"]
    # layers 0-1 override answer's sources, 2-3 do not: two relation groups.
    assert [g["layers"] for g in data["relations"]] == [[0, 1], [2, 3]]


def test_verdict_comes_first_in_every_text_format(refuted):
    html = report.render(refuted, "html")
    h2 = [m.start() for m in re.finditer("<h2", html)]
    assert html[h2[0]:].startswith('<h2 id="verdict">Verdict</h2>')
    assert h2[0] < html.index('id="verdict-banner"') < h2[1]
    md = report.render(refuted, "md")
    assert md.index("**Verdict: REFUTED**") < md.index("## The system")


def test_every_forbid_rule_has_verdict_method_scope_location_and_witness_picture(refuted):
    data = report.build(refuted)
    html = report.to_html(data)
    assert [r["id"] for r in data["rules"]] == ["forbid[0]", "forbid[1]"]
    yaml_lines = (refuted.parent / "refuted.yaml").read_text().splitlines()
    for rule in data["rules"]:
        assert rule["status"] == "REFUTED" and rule["method"]["name"] == "graph-search"
        assert rule["scope"]["layers"] == 4
        loc = rule["location"]
        assert loc["file"].endswith("refuted.yaml")
        assert yaml_lines[loc["line"] - 1].lstrip().startswith("- "), "location must point at the rule"
        assert f"{Path(loc['file']).name}:{loc['line']}:{loc['column']}" in html
        for w in rule["witness"]:
            # The witness picture carries the path as its text alternative.
            assert f"<desc>{w['text'].replace('→', '→')}</desc>" in html
    assert "toxicology@0 → summary@1 → answer@2" in html


def test_relation_pictures_show_exactly_the_compiled_tables(refuted):
    data = report.build(refuted)
    html = report.to_html(data)
    rel = np.load(refuted / "relations.npy")
    svgs = re.findall(r'<svg[^>]*aria-label="Relation at layers? [^"]*".*?</svg>', html, re.S)
    assert len(svgs) == len(data["relations"]) >= 1
    for g, svg in zip(data["relations"], svgs):
        assert (np.array(g["matrix"], dtype=bool) == rel[g["layers"][0]]).all()
        for layer in g["layers"]:
            assert (rel[layer] == rel[g["layers"][0]]).all()
        assert svg.count('fill="#0550ae"') == int(rel[g["layers"][0]].sum()), "one dark cell per allowed pair"
    # The attention edge of the two-hop witness (answer reads summary, at layer 1) is outlined in red.
    assert "#cf222e" in svgs[0] and 'stroke="#cf222e" stroke-width="2"' in svgs[0]


def test_domain_tree_block_map_and_sparsity(proved):
    data = report.build(proved)
    html = report.to_html(data)
    assert 'aria-label="Domain tree (pre-order ids)"' in html
    bm = data["blockmap"]
    assert bm is not None and bm["segments"][-1]["domain"] == "answer", "generation domain goes last"
    for m in bm["maps"]:
        t = m["tiles"]
        assert t["empty"] + t["partial"] + t["full"] == t["total"] == len(m["kinds"]) * len(m["kinds"][0])
    ex = data["sparsity"]["example"]
    assert 0 < ex["layers"][0]["flops_saved"] < 1
    assert "FLOPs skipped" in html and "Block map at layer 0" in html


def test_explanations_audit_leak_test_assumptions_digests_and_mapping(refuted):
    add_model_evidence(refuted)
    data = report.build(refuted)
    _validate(data)
    html = report.to_html(data)
    exp = data["rules"][0]["explanation"]
    assert exp["status"] == "PROVED" and exp["relies_on"]
    for entry in exp["relies_on"]:
        assert entry in html
    assert data["leak_test"]["guarded_rate"] == 0.0 and data["leak_test"]["dense_rate"] == 0.75
    assert 'aria-label="Cross-domain leakage rate"' in html and "dense model" in html
    assert "No operation other than guarded attention mixes sequence positions" in html
    assert "training data memorisation" in html.lower() and "Not covered" in html
    for name in ("z3", "torch", "networkx", "python"):
        assert name in data["tools"]
    assert data["source"]["certificate_sha256"] in html and data["source"]["canonical_sha256"] in html
    for needle in ("Annex IV", "2(g) validation and testing procedures", "MEASURE 2.7", "MAP 2.2",
                   "A.6.2.4 AI system verification and validation", "A.6.2.7 AI system technical documentation",
                   "not a conformity assessment"):
        assert needle in html, needle


# --- never more than the certificate ---------------------------------------------------------
def test_unknown_claim_is_never_shown_as_a_pass(proved):
    def make_unknown(cert):
        c = cert["claims"][0]
        c["status"], c["reason"] = "UNKNOWN", "z3: timeout"
        cert["verdict"] = "UNKNOWN"

    edit_certificate(proved, make_unknown)
    data = report.build(proved)
    _validate(data)
    assert data["verdict"]["shown"] == "UNKNOWN"
    html = report.to_html(data)
    assert _banner(html) == "UNKNOWN" and "UNKNOWN is never a pass" in html
    row = re.search(r"<code>forbid\[0\]</code></td>.*?</tr>", html).group(0)
    assert ">UNKNOWN</span>" in row and "PROVED" not in row and "<td>stronger</td>" in row
    assert data["claims"][0]["rechecked"] == "PROVED"  # the data says what re-derivation found...
    assert not any("PROVED;" in r for r in data["verdict"]["reasons"])  # ...but it never lifts the verdict
    assert "not established, not a pass: z3: timeout" in html
    md = report.to_markdown(data)
    assert "**Verdict: UNKNOWN**" in md and "**Verdict: PROVED**" not in md
    pdf = report.to_pdf(data)
    banner = re.findall(rb"/F2 26 Tf [^\n]*? Tm \((\w+)\) Tj", zlib_text(pdf))
    assert banner == [b"UNKNOWN"]


def zlib_text(pdf: bytes) -> bytes:
    """All content streams of a PDF written by report.to_pdf, inflated."""
    import zlib

    out = []
    for m in re.finditer(rb"stream\n(.*?)\nendstream", pdf, re.S):
        out.append(zlib.decompress(m.group(1)))
    return b"\n".join(out)


def test_certificate_verdict_stronger_than_its_claims_is_weakened(proved):
    edit_certificate(proved, lambda c: c["claims"][1].update(status="REFUTED"))  # verdict still says PROVED
    data = report.build(proved)
    assert data["verdict"]["certificate"] == "PROVED" and data["verdict"]["shown"] == "REFUTED"
    assert data["verdict"]["reasons"][0].startswith("the certificate says PROVED; this report shows REFUTED")


def test_forged_certificate_is_caught_by_re_deriving_the_claims(refuted):
    edit_certificate(refuted, forge_proved)
    data = report.build(refuted)
    _validate(data)
    assert data["verdict"]["certificate"] == "PROVED" and data["verdict"]["shown"] == "REFUTED"
    assert "re-derived from the policy, forbid[0] is REFUTED; the certificate says PROVED" in data["verdict"]["reasons"]
    assert [c["rechecked"] for c in data["claims"]] == ["REFUTED", "REFUTED", "PROVED", "PROVED"]
    assert _banner(report.to_html(data)) == "REFUTED"


def test_certificate_that_drops_a_claim_is_caught(refuted):
    def drop(cert):
        cert["claims"] = [c for c in cert["claims"] if c["id"] != "forbid[0]"]
        cert["claims"][0].update(status="PROVED")
        cert["claims"][0].pop("witness", None)
        cert["verdict"] = "PROVED"

    edit_certificate(refuted, drop)
    data = report.build(refuted)
    assert data["verdict"]["shown"] == "REFUTED"
    assert any("forbid[0] is REFUTED, and the certificate does not carry it" in r for r in data["verdict"]["reasons"])


def test_no_claims_is_not_proved(tmp_path):
    d = compile_dir(tmp_path, PROVED_POLICY.split("forbid:")[0] + "generation: {domain: answer}\n", name="empty")
    edit_certificate(d, lambda c: c.update(claims=[], verdict="PROVED"))
    data = report.build(d)
    assert data["verdict"]["shown"] == "UNKNOWN"
    assert "no claims" in " ".join(data["verdict"]["reasons"])
    assert "nothing about information flow is claimed" in report.to_html(data)


def test_changed_file_downgrades_proved_and_names_the_file(proved):
    rel = np.load(proved / "relations.npy")
    rel[0, -1, :] = True  # let the answer read everything at layer 0
    np.save(proved / "relations.npy", rel)
    data = report.build(proved)
    assert data["verdict"]["shown"] == "UNKNOWN"
    assert any("relations.npy" in r for r in data["verdict"]["reasons"])
    assert {r["item"]: r["status"] for r in data["integrity"]["files"]}["relations.npy"] == "mismatch"


def test_policy_no_longer_matching_its_tables_is_caught(proved):
    text = (proved / "policy.yaml").read_text().replace("answer: [instructions, records, medicine]",
                                                         "answer: [instructions, records, medicine, toxicology]")
    (proved / "policy.yaml").write_text(text)
    data = report.build(proved)
    status = {r["item"]: r["status"] for r in data["integrity"]["files"]}
    assert status["policy.yaml"] == "mismatch" and status["relation tables"] == "mismatch"
    # The edited policy also lets toxicology reach the answer: re-deriving the claims refutes it.
    assert data["verdict"]["shown"] == "REFUTED"
    assert "re-derived from the policy, forbid[0] is REFUTED; the certificate says PROVED" in data["verdict"]["reasons"]


@pytest.mark.parametrize("evidence", [dict(guarded_rate=0.25),
                                      dict(audit_findings=[{"op": "aten.cumsum", "module": "model.layers.0.mlp",
                                                            "kind": "reduction", "message": "sums over tokens"}])])
def test_model_evidence_against_isolation_downgrades_proved(proved, evidence):
    add_model_evidence(proved, **evidence)
    data = report.build(proved)
    _validate(data)
    assert data["verdict"]["certificate"] == "PROVED" and data["verdict"]["shown"] == "UNKNOWN"
    html = report.to_html(data)
    assert _banner(html) == "UNKNOWN"
    if "audit_findings" in evidence:
        assert "model.layers.0.mlp" in html and "aten.cumsum" in html


@settings(max_examples=150, deadline=None)
@given(cert_v=st.sampled_from(["PROVED", "REFUTED", "UNKNOWN", "MAYBE"]),
       statuses=st.lists(st.sampled_from(["PROVED", "REFUTED", "UNKNOWN", "proved", None]), max_size=6),
       ok=st.booleans(), leak=st.sampled_from([None, 0.0, 0.01]), audit_clean=st.sampled_from([None, True, False]),
       rechecked=st.dictionaries(st.sampled_from([f"c{i}" for i in range(8)]),
                                 st.sampled_from(["PROVED", "REFUTED", "UNKNOWN"]), max_size=4))
def test_shown_verdict_is_proved_only_when_everything_says_so(cert_v, statuses, ok, leak, audit_clean, rechecked):
    claims = [report._claim_row({"id": f"c{i}", "kind": "flow", "statement": "s", "status": s})
              for i, s in enumerate(statuses)]
    integrity = {"ok": ok, "files": [] if ok else [{"item": "x", "status": "mismatch"}],
                 "signature": {"status": "absent", "detail": ""}}
    leak_rec = None if leak is None else {"guarded": {"rate": leak}}
    audit = None if audit_clean is None else {"clean": audit_clean}
    v = report._shown_verdict({"verdict": cert_v}, claims, integrity, leak_rec, audit, rechecked)
    everything = (cert_v == "PROVED" and statuses and all(s == "PROVED" for s in statuses) and ok
                  and not leak and audit_clean is not False and all(r == "PROVED" for r in rechecked.values()))
    assert (v["shown"] == "PROVED") == bool(everything)
    if v["shown"] != "PROVED":
        assert v["reasons"], "a weaker verdict always says why"
    if "REFUTED" in statuses or cert_v == "REFUTED" or "REFUTED" in rechecked.values():
        assert v["shown"] == "REFUTED"
    jsonschema.validate({"verdict": v}, {"properties": {"verdict": report.REPORT_SCHEMA["properties"]["verdict"]}})


def test_schema_rejects_a_forged_pass():
    forged = {"certificate": "UNKNOWN", "shown": "PROVED", "claims": "UNKNOWN",
              "counts": {"PROVED": 0, "REFUTED": 0, "UNKNOWN": 1}, "reasons": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(forged, report.REPORT_SCHEMA["properties"]["verdict"])


# --- every policy we ship, every format --------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(p.relative_to(REPO / "policies").as_posix()
                                          for p in (REPO / "policies").rglob("*.yaml")))
def test_every_shipped_policy_renders_in_every_format(tmp_path, policy):
    text = (REPO / "policies" / policy).read_text()
    d = compile_dir(tmp_path, text, name=Path(policy).stem, layers=None if "num_layers:" in text else 6)
    data = report.build(d)
    _validate(data)
    cert = json.loads((d / "certificate.json").read_text())
    assert data["verdict"]["shown"] in (cert["verdict"], "UNKNOWN")
    if cert["verdict"] != "PROVED":
        assert data["verdict"]["shown"] != "PROVED"
    for fmt in report.FORMATS:
        out = report.render(d, fmt)
        assert out and isinstance(out, bytes if fmt == "pdf" else str)


# --- output form -------------------------------------------------------------------------------
def test_rendering_is_deterministic(refuted):
    for fmt in ("html", "pdf", "json", "md", "sarif"):
        assert report.render(refuted, fmt) == report.render(refuted, fmt), fmt


def test_html_is_self_contained_and_escapes_everything(tmp_path):
    evil = PROVED_POLICY.replace("description: Hospital assistant; toxicology is for screening only.",
                                 "description: '<script>alert(1)</script> & <img src=x onerror=y>'")
    d = compile_dir(tmp_path, evil, name="evil")
    html = report.render(d, "html")
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert not re.search(r"""(src|href)=["'](https?:|//)""", html), "no external resources"
    assert "default-src 'none'" in html


def test_pdf_cross_reference_table_is_exact(refuted):
    pdf = report.render(refuted, "pdf")
    assert pdf.startswith(b"%PDF-1.4\n") and pdf.endswith(b"%%EOF\n")
    startxref = int(re.search(rb"startxref\n(\d+)\n%%EOF", pdf).group(1))
    assert pdf[startxref:startxref + 5] == b"xref\n"
    header = re.match(rb"xref\n0 (\d+)\n", pdf[startxref:])
    n = int(header.group(1))
    entries = pdf[startxref + header.end():].split(b"\n")[:n]
    assert entries[0].startswith(b"0000000000 65535 f")
    for i, e in enumerate(entries[1:], start=1):
        off = int(e[:10])
        assert pdf[off:].startswith(f"{i} 0 obj\n".encode()), f"object {i} not at offset {off}"
    text = zlib_text(pdf)
    assert b"(REFUTED) Tj" in text and b"(Verdict) Tj" in text


def test_text_width_matches_helvetica_metrics():
    # Adobe AFM: "Hello" = H 722 + e 556 + l 222 + l 222 + o 556 = 2278 units.
    assert report.text_width("Hello", 10) == pytest.approx(22.78)
    assert report.text_width("Hello", 10, bold=True) == pytest.approx((722 + 556 + 278 + 278 + 611) / 100)
    assert report.text_width("abc", 10, mono=True) == pytest.approx(18.0)
    assert report._pdf_safe("a → b ≥ c ↻ d") == "a -> b >= c => d"


def test_write_report_writes_each_format(refuted, tmp_path):
    for fmt in report.FORMATS:
        out = tmp_path / f"r.{fmt}"
        report.write_report(refuted, fmt, out)
        assert out.stat().st_size > 500
    json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")


# --- errors ------------------------------------------------------------------------------------
def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(BundleError) as e:
        report.render(tmp_path / "nope", "html")
    assert e.value.code == "DG430" and e.value.location.file.endswith("nope")


def test_directory_without_certificate(tmp_path):
    with pytest.raises(BundleError) as e:
        report.render(tmp_path, "html")
    assert "certificate.json" in str(e.value)


def test_malformed_certificate_names_the_file(refuted):
    (refuted / "certificate.json").write_text('{"format": "domainguard-certificate/1", "verdict": "MAYBE"}')
    with pytest.raises(BundleError) as e:
        report.render(refuted, "json")
    assert "certificate.json" in str(e.value)


def test_malformed_certificate_is_one_line_naming_the_first_problem(refuted):
    edit_certificate(refuted, lambda c: c.update(verdict="MAYBE", format="x"))
    with pytest.raises(BundleError) as e:
        report.render(refuted, "md")
    text = str(e.value)
    assert e.value.code == "DG402" and "\n" not in text and "format:" in text and "(and 1 more)" in text


@pytest.mark.parametrize("edit", [
    lambda c: c["scope"].update(profile=[]),
    lambda c: c["scope"].update(profile={"a": 1}),
    lambda c: c["threat_model"].update(not_covered=1),
    lambda c: c["claims"][0]["details"].update(rule=1),
    lambda c: c["claims"][0]["details"].update(rule={"flow": None}),
    lambda c: c["claims"][0]["details"].update(rule={"flow": {}}),
], ids=["profile-list", "profile-dict", "not-covered-int", "rule-int", "flow-null", "flow-empty"])
def test_certificate_of_wrong_types_renders_or_is_refused_never_crashes(refuted, edit):
    # Shapes the certificate's schema lets through (free-form objects) but the report reads into.
    edit_certificate(refuted, edit)
    for fmt in ("md", "json", "sarif", "html"):
        try:
            out = report.render(refuted, fmt)
        except BundleError:
            continue
        assert out and "PROVED" not in out.split("\n", 3)[0]


def test_report_is_never_written_inside_the_directory_it_reports_on(refuted):
    cert = (refuted / "certificate.json").read_bytes()
    for out in (refuted / "certificate.json", refuted / "report.html", refuted / "sub" / "r.md"):
        with pytest.raises(BundleError) as e:
            report.write_report(refuted, None, out)
        assert e.value.code == "DG434"
    with pytest.raises(BundleError):
        report.write_report(refuted / "certificate.json", "json", refuted / "certificate.json")
    assert (refuted / "certificate.json").read_bytes() == cert and not (refuted / "report.html").exists()


def test_format_and_a_suffix_that_disagree_are_refused(refuted, tmp_path):
    with pytest.raises(BundleError) as e:
        report.write_report(refuted, "pdf", tmp_path / "r.html")
    assert e.value.code == "DG432" and not (tmp_path / "r.html").exists()
    report.write_report(refuted, "html", tmp_path / "r.txt")  # an unknown suffix takes --format
    assert (tmp_path / "r.txt").read_text().startswith("<!DOCTYPE html>")


def test_unknown_format(refuted):
    with pytest.raises(BundleError) as e:
        report.render(refuted, "docx")
    assert e.value.code == "DG432"


def test_missing_policy_still_reports_with_a_note(refuted):
    for name in ("policy.yaml", "policy.json"):
        (refuted / name).unlink()
    data = report.build(refuted)
    _validate(data)
    assert data["domains"] == [] and data["relations"] == []
    assert any("no policy" in n for n in data["notes"])
    assert data["verdict"]["shown"] == "REFUTED"  # missing files weaken, never strengthen
    assert {r["item"]: r["status"] for r in data["integrity"]["files"]}["policy.yaml"] == "missing"


# --- large policies ----------------------------------------------------------------------------
def _big_policy(groups: int = 12, per: int = 9) -> str:
    """``groups`` × ``per`` leaves under group nodes, a ring of reads and a leak through it."""
    lines = ["domainguard: 1", "name: wide", "domains:"]
    names = []
    for g in range(groups):
        lines.append(f"  g{g}:")
        lines.append("    children: {" + ", ".join(f"g{g}_d{i}: {{}}" for i in range(per)) + "}")
        names += [f"g{g}_d{i}" for i in range(per)]
    lines.append("  out: {}")
    lines.append("reads:")
    for k, n in enumerate(names):
        lines.append(f"  {n}: [{names[k - 1]}]")
    lines.append(f"  out: [{names[-1]}]")
    lines += ["forbid:", f"  - flow: {{from: {names[-3]}, to: out}}", "generation: {domain: out}"]
    return "\n".join(lines) + "\n"


def test_large_policy_draws_relations_as_pixels_that_match_the_tables(tmp_path):
    d = compile_dir(tmp_path, _big_policy(), name="wide", layers=6)
    data = report.build(d)
    _validate(data)
    D = len(data["domains"])
    assert D == 12 * 10 + 1 > report._VECTOR_MATRIX_MAX
    html = report.to_html(data)
    assert len(html) < 3_000_000
    rel = np.load(d / "relations.npy")
    images = re.findall(r'aria-label="Relation at layers? [^"]*".*?href="data:image/png;base64,([^"]+)"', html, re.S)
    assert len(images) == len(data["relations"])
    wit = report._witness_cells(data)
    for g, b64 in zip(data["relations"], images):
        png = tmp_path / "m.png"
        png.write_bytes(base64.b64decode(b64))
        img = decode_png(png)
        assert img.shape == (D, D, 3)
        dark = (img == [0x05, 0x50, 0xAE]).all(axis=2)
        red = (img == [0xCF, 0x22, 0x2E]).all(axis=2)
        expected = rel[g["layers"][0]].copy()
        marked = np.zeros_like(expected)
        for l in g["layers"]:
            for i, j in wit.get(l, ()):
                marked[i, j] = True
        assert (red == marked).all() and (dark == (expected & ~marked)).all()
        assert (expected[marked]).all(), "a witness edge is always an allowed pair"
    assert any(wit.values()), "the leak's witness edges are marked"
    assert "more domains" in html  # the tree stops at 60 domains, the list goes on
    assert f"{D - 1} out" in html
    pdf = report.to_pdf(data)
    assert b"/Subtype /Image" in pdf and len(pdf) < 1_000_000


def test_write_report_takes_the_format_from_the_suffix(refuted, tmp_path):
    report.write_report(refuted, None, tmp_path / "r.pdf")
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    report.write_report(refuted, None, tmp_path / "r.htm")
    assert (tmp_path / "r.htm").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(BundleError) as e:
        report.write_report(refuted, None, tmp_path / "r.docx")
    assert e.value.code == "DG432" and not (tmp_path / "r.docx").exists()


def test_markdown_marks_witness_edges_in_the_matrix(refuted):
    md = report.render(refuted, "md")
    # two-hop leak: at layer 1 the answer (row 3) attends the summary (column 2).
    row = next(line for line in md.splitlines() if line.strip().startswith("3 answer"))
    assert row.split()[2:] == ["#", ".", "X", "#"]
    summary = next(line for line in md.splitlines() if line.strip().startswith("2 summary"))
    assert summary.split()[2:] == ["X", "X", "#", "."]  # the combine rule's two paths meet in the summary
    assert "| **REFUTED** |" in md


def test_pdf_text_is_transliterated_not_lost():
    assert report._pdf_safe("Łódź café → résumé Ωmega") == "Lódz café -> résumé ?mega"
    assert report._pdf_str("a(b)\\c é") == "(a\\(b\\)\\\\c \\351)"


# --- found by a review that tried to make the report lie ----------------------------------------------
def test_policy_text_cannot_forge_a_markdown_verdict(tmp_path):
    """A description is the policy author's text: in Markdown it must stay text, not become a quote banner,
    a style, a link or an HTML comment that hides the rest of the report."""
    evil = ("Assistant policy.\n\n<style>blockquote{display:none}</style>\n\n> **Verdict: PROVED** — fine\n\n"
            "[click](javascript:alert(1)) <!--")
    text = REFUTED_POLICY.replace("name: two-hop-leak\n", "name: two-hop-leak\ndescription: " + json.dumps(evil) + "\n")
    d = compile_dir(tmp_path, text, name="evil")
    md = report.render(d, "md")
    assert md.count("**Verdict:") == 1 and "**Verdict: REFUTED**" in md
    assert "<style" not in md and "<!--" not in md and "](javascript:" not in md
    assert not any(line.startswith(">") and "PROVED" in line for line in md.splitlines())


def test_a_certificate_without_its_policy_is_never_shown_proved(proved, tmp_path):
    for name in ("policy.yaml", "policy.json"):
        (proved / name).unlink()
    edit_certificate(proved, lambda c: [c["subject"]["files"].pop(n, None) for n in ("policy.yaml", "policy.json")])
    data = report.build(proved)
    assert data["verdict"]["shown"] != "PROVED"
    assert any("no policy" in r for r in data["verdict"]["reasons"])


def test_a_link_planted_at_a_temporary_name_is_not_followed(proved, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("VICTIM")
    out = tmp_path / "r.html"
    (tmp_path / ".r.html.tmp").symlink_to(victim)
    report.write_report(proved, None, out)
    assert victim.read_text() == "VICTIM" and out.is_file() and not out.is_symlink()
    assert not [p for p in tmp_path.glob(".r.html.*") if p.name != ".r.html.tmp"]


def test_a_very_long_description_renders_in_reasonable_time(tmp_path):
    import time

    text = PROVED_POLICY.replace("{description: System instructions}", "{description: " + "x" * 50_000 + "}")
    d = compile_dir(tmp_path, text, name="long")
    t0 = time.perf_counter()
    report.render(d, "html")
    assert time.perf_counter() - t0 < 30
