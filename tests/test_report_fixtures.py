"""Shared builders for the report, signing and SARIF tests (no tests here).

Directories are made the way users make them, through `domainguard compile`; the
model evidence a bundle adds (graph audit, leak test) is written in the shapes
``AuditReport.to_dict`` and ``LeakReport.to_dict`` produce.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from domainguard import cli

PROVED_POLICY = """\
# A policy whose rules hold.
domainguard: 1
name: clinical-assistant
description: Hospital assistant; toxicology is for screening only.
domains:
  instructions: {description: System instructions}
  records: {description: Patient records}
  medicine:
    children: {pharmacology: {}, dosing: {}}
  toxicology: {description: Screening references}
  answer: {}
reads:
  records: [instructions]
  medicine: [instructions]
  toxicology: [instructions]
  answer: [instructions, records, medicine]
forbid:
  - flow: {from: toxicology, to: answer}
  - combine: [pharmacology, toxicology]
layers:
  - layers: "0-1"
    reads: {answer: [instructions]}
patterns:
  default: {causal: true}
profiles:
  public: {reads: {answer: [instructions, medicine]}}
generation: {domain: answer}
positions: per_domain
"""

REFUTED_POLICY = """\
# Two leaks: a two-hop flow and a combination.
domainguard: 1
name: two-hop-leak
domains:
  instructions: {}
  toxicology: {}
  summary: {}
  answer: {}
reads:
  summary: [instructions, toxicology]
  answer: [instructions, summary]
forbid:
  - flow: {from: toxicology, to: answer}
  - combine: [instructions, toxicology]
generation: {domain: answer}
"""


def compile_dir(tmp_path: Path, text: str, *, layers: int | None = 4, name: str = "policy") -> Path:
    """`domainguard compile` a policy text into ``tmp_path/<name>.compiled`` (``layers=None``: the policy's own)."""
    src = tmp_path / f"{name}.yaml"
    src.write_text(text)
    out = tmp_path / f"{name}.compiled"
    code = cli.main(["compile", str(src), "-o", str(out)] + (["--layers", str(layers)] if layers else []))
    assert code in (0, 1, 3), f"compile failed with exit code {code}"
    return out


def edit_certificate(d: Path, fn) -> dict:
    """Apply ``fn`` to the certificate of directory ``d`` in place; returns the new certificate."""
    p = d / "certificate.json"
    cert = json.loads(p.read_text())
    fn(cert)
    p.write_text(json.dumps(cert, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return cert


def leak_record(rate: float, *, guarded: bool, trials: int = 24) -> dict:
    leaks = round(rate * trials)
    return {
        "model": "LlamaForCausalLM", "guarded": guarded, "trials": trials, "leaks": leaks, "rate": leaks / trials,
        "by_poison": {p: {"trials": trials // 3, "leaks": leaks // 3} for p in ("random", "nan", "inf")},
        "by_source": {"toxicology": {"trials": trials, "leaks": leaks}},
        "outputs": ["logits", "hidden_states", "generate"], "seed": 0, "seconds": 1.25, "examples": [],
    }


def add_model_evidence(d: Path, *, guarded_rate: float = 0.0, dense_rate: float = 0.75,
                       audit_findings: list[dict] | None = None) -> dict:
    """Give a compiled directory the audit and leak-test records a certified bundle carries."""
    def fn(cert):
        cert["audit"] = {
            "model": "LlamaForCausalLM", "clean": not audit_findings, "findings": audit_findings or [],
            "guarded_attention_calls": {"0": 1, "1": 1, "2": 1, "3": 1}, "num_layers": 4, "ops_checked": 412,
            "notes": ["rotary embeddings act per position"], "method": {"name": "torch.export", "version": "2.13"},
        }
        cert["leak_test"] = {"guarded": leak_record(guarded_rate, guarded=True),
                             "dense": leak_record(dense_rate, guarded=False)}
        cert["subject"]["weights"] = {"sha256": "ab" * 32, "files": {}}

    return edit_certificate(d, fn)


# --- PNG / PGM decoding for the rendering tests (no imaging library needed) --------------------
def decode_png(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] of an 8-bit, non-interlaced grey/RGB/RGBA PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and interlace == 0 and ctype in (0, 2, 6), f"unsupported PNG {hdr}"
    bpp = {0: 1, 2: 3, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.uint8)
    for y in range(h):
        f, line = int(raw[y, 0]), raw[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:
            cur = (np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif f == 2:
            cur = line + prev
        else:  # average / Paeth: sequential along the row
            cur_b, p = bytearray(line.tobytes()), prev.tobytes()
            for i in range(len(cur_b)):
                a = cur_b[i - bpp] if i >= bpp else 0
                b = p[i]
                if f == 3:
                    cur_b[i] = (cur_b[i] + ((a + b) >> 1)) & 255
                else:
                    c = p[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur_b[i] = (cur_b[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(cur_b), dtype=np.uint8)
        out[y] = cur
        prev = cur
    img = out.reshape(h, w, bpp)
    return np.repeat(img, 3, axis=2) if bpp == 1 else img[:, :, :3]


def hex_rgb(color: str) -> np.ndarray:
    c = color.lstrip("#")
    return np.array([int(c[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.int16)


def has_color(img: np.ndarray, color: str, tol: int = 24, min_pixels: int = 20) -> bool:
    diff = np.abs(img.astype(np.int16) - hex_rgb(color)).max(axis=2)
    return int((diff <= tol).sum()) >= min_pixels


def ink_fraction(img: np.ndarray) -> float:
    """Share of pixels that are not (near) white."""
    return float((img.astype(np.int16).min(axis=2) < 235).mean())


def forge_proved(cert: dict) -> None:
    """Edit a certificate (dict) to claim everything PROVED: every claim, witnesses dropped, the verdict."""
    for c in cert["claims"]:
        c.update(status="PROVED")
        c.pop("witness", None)
    cert["verdict"] = "PROVED"
