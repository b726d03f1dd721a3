"""Triton kernels that enforce a frozen domain relation (imported as ``domainguard.kernels``).

``tables`` freezes a compiled policy into compile-time constants; ``plan`` sorts tokens
into domain-pure tiles; ``forward``, ``backward`` and ``decode`` are the kernels, each
with a PyTorch reference beside it (``forward_sm90`` and ``dq_sm90`` are the forward's and the
dq kernel's warp-specialised Gluon forms for sm_90 GPUs); ``permute`` moves rows between token orders.
``source_digest()`` is the sha256 a certificate records for the code that enforces
the relation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def source_files() -> list[Path]:
    """The kernel source files, sorted by name (what ``source_digest`` covers)."""
    return sorted(p for p in _HERE.glob("*.py"))


def source_digest() -> str:
    """sha256 over (name, sha256 of bytes) of every kernel source file."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def source_manifest() -> dict[str, str]:
    """{file name: sha256 of its bytes}, for the certificate's ``subject.kernels.files``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files()}


__all__ = ["source_digest", "source_files", "source_manifest"]
