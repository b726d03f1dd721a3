"""The report as people see it: HTML in headless Chromium, PDF through poppler, looked at as pixels.

These tests skip only when the binaries are truly absent (CI installs them: `.ci/setup --test`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from domainguard import report
from test_report_fixtures import (
    PROVED_POLICY,
    REFUTED_POLICY,
    add_model_evidence,
    compile_dir,
    decode_png,
    edit_certificate,
    has_color,
    ink_fraction,
)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
POPPLER = all(shutil.which(n) for n in ("pdftoppm", "pdftotext", "pdfinfo"))
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
needs_poppler = pytest.mark.skipif(not POPPLER, reason="poppler-utils is not installed (apt-get install poppler-utils)")

RED, GREEN, AMBER = report.COLOR["REFUTED"], report.COLOR["PROVED"], report.COLOR["UNKNOWN"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, text=True)


def _screenshot(tmp_path: Path, html_file: Path, name: str):
    png = tmp_path / f"{name}.png"
    # Half scale keeps the pure-Python PNG decoding quick; 1100x2400 CSS pixels show the top of the report.
    proc = _chromium(tmp_path, "--window-size=1100,2400", "--force-device-scale-factor=0.5",
                     f"--screenshot={png}", html_file.as_uri())
    assert png.is_file(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    return decode_png(png)


def _dom(tmp_path: Path, html_file: Path) -> str:
    proc = _chromium(tmp_path, "--dump-dom", html_file.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_chromium
def test_refuted_report_in_chromium(tmp_path):
    d = compile_dir(tmp_path, REFUTED_POLICY, name="leaky")
    add_model_evidence(d, dense_rate=0.5)
    html_file = tmp_path / "report.html"
    report.write_report(d, "html", html_file)
    dom = _dom(tmp_path, html_file)
    assert "<title>domainguard audit report: two-hop-leak</title>" in dom
    assert '<h1 id="top">domainguard audit report: two-hop-leak</h1>' in dom
    assert len(re.findall(r"<svg\b", dom)) >= 6  # tree, relations, block maps, witnesses, leak bars
    img = _screenshot(tmp_path, html_file, "refuted")
    h = img.shape[0]
    assert img.shape[1] == 550 and h == 1200
    assert ink_fraction(img) > 0.03, "screenshot is blank"
    top = img[: h // 3]
    assert has_color(top, RED), "the REFUTED banner is not at the top"
    assert has_color(top, report.TINT["REFUTED"], tol=6, min_pixels=500)
    assert not has_color(top, GREEN, tol=10, min_pixels=50)
    assert has_color(img, "#0550ae", min_pixels=200), "relation matrices / block maps are not drawn"


@needs_chromium
def test_proved_report_in_chromium(tmp_path):
    d = compile_dir(tmp_path, PROVED_POLICY, name="fine")
    html_file = tmp_path / "report.html"
    report.write_report(d, "html", html_file)
    assert "<title>domainguard audit report: clinical-assistant</title>" in _dom(tmp_path, html_file)
    img = _screenshot(tmp_path, html_file, "proved")
    assert ink_fraction(img) > 0.03
    top = img[: img.shape[0] // 3]
    assert has_color(top, GREEN) and has_color(top, report.TINT["PROVED"], tol=6, min_pixels=500)
    assert not has_color(img, RED, tol=10, min_pixels=30), "nothing is refuted, nothing may be red"


def _poppler(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Syntax Error" not in proc.stderr and b"Syntax Warning" not in proc.stderr, proc.stderr
    return proc


@needs_poppler
@pytest.mark.parametrize("policy, verdict", [(REFUTED_POLICY, "REFUTED"), (PROVED_POLICY, "PROVED"),
                                             (PROVED_POLICY, "UNKNOWN")], ids=["refuted", "proved", "unknown"])
def test_pdf_pages_rasterise_and_read_back(tmp_path, policy, verdict):
    d = compile_dir(tmp_path, policy, name="p")
    add_model_evidence(d)
    if verdict == "UNKNOWN":
        edit_certificate(d, lambda c: (c["claims"][0].update(status="UNKNOWN", reason="z3: timeout"),
                                       c.update(verdict="UNKNOWN")))
    pdf = tmp_path / "report.pdf"
    report.write_report(d, "pdf", pdf)
    info = _poppler("pdfinfo", str(pdf)).stdout.decode()
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert 4 <= pages <= 30 and "A4" in info
    assert re.search(r"Title:\s+domainguard audit report: ", info)
    _poppler("pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page"))
    pngs = sorted(tmp_path.glob("page-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(pngs) == pages
    for p in pngs:
        img = decode_png(p)
        assert img.shape[0] > img.shape[1] and ink_fraction(img) > 0.004, f"{p.name} is blank"
    first = decode_png(pngs[0])
    color = {"REFUTED": RED, "PROVED": GREEN, "UNKNOWN": AMBER}[verdict]
    top = first[: first.shape[0] // 3]
    assert has_color(top, color, tol=30, min_pixels=15)
    for other in {RED, GREEN, AMBER} - {color}:
        assert not has_color(top, other, tol=12, min_pixels=15), "the banner shows one verdict"
    text = _poppler("pdftotext", "-layout", str(pdf), "-").stdout.decode()
    banner = text[: text.index("The system and its deployment profile")]
    assert verdict in banner and not {"PROVED", "REFUTED", "UNKNOWN"} - {verdict} & set(re.findall(r"[A-Z]{6,}", banner))
    for needle in ("forbid[0]", "forbid[1]", "Leak test", "Graph audit", "Annex IV", "ISO/IEC 42001",
                   "MEASURE 2.7", "Not covered", "relations.npy"):
        assert needle in text, needle
    if verdict == "REFUTED":
        assert "toxicology@0 -> summary@1 -> answer@2" in text
