"""domainguard: domain policies → proved attention masks → frozen kernels → certified models.

Public names are imported lazily so that ``import domainguard`` stays cheap and the
CLI starts fast; see DESIGN §8 for the contract.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    # policy → flow → verify
    "load_policy": "domainguard.parse",
    "loads_policy": "domainguard.parse",
    "Policy": "domainguard.policy",
    "compile": "domainguard.compiled",
    "CompiledPolicy": "domainguard.compiled",
    "verify": "domainguard.verify",
    "Verdict": "domainguard.verdict",
    "Status": "domainguard.verdict",
    # layout → blockmap
    "Layout": "domainguard.layout",
    "BlockMap": "domainguard.blockmap",
    "build_blockmap": "domainguard.blockmap",
    # kernels
    "attention": "domainguard.attention",
    "GuardedAttention": "domainguard.attention",
    # guard → certify
    "guard": "domainguard.guard",
    "save_certified": "domainguard.bundle",
    "load_certified": "domainguard.bundle",
    # errors
    "DomainGuardError": "domainguard.errors",
    "PolicyError": "domainguard.errors",
    "ProofError": "domainguard.errors",
    "LayoutError": "domainguard.errors",
    "KernelError": "domainguard.errors",
    "BundleError": "domainguard.errors",
    "ModelError": "domainguard.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


class _Package(types.ModuleType):
    """Keeps ``dg.verify``, ``dg.attention``, ``dg.guard`` the functions even after their
    same-named submodules are imported (the import system would bind the module)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'domainguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
