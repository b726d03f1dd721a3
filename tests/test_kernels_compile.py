"""Every kernel compiles for an H100 (sm_90a), on a machine with no GPU.

The interpreter-based CPU tests check what the kernels compute; this one checks that
Triton's real code generator and ptxas accept every specialisation a call makes
(tests/sm90_compile.py explains how). It is what catches, without a GPU, a kernel that
works under the interpreter and does not compile for the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_for_hopper(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # a cold cache: every kernel really compiles
    r = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, f"compile for sm_90a failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(compiled_for_hopper):
    by_call: dict[str, set] = {}
    for rec in compiled_for_hopper:
        by_call.setdefault(rec["call"], set()).add(rec["kernel"])
    # one launch moves K/V into slot order beside the forward's table check, one runs both of the
    # backward's table checks
    train = {"_kv_checks_kernel", "_fwd_kernel", "_bwd_prep_kernel", "_bwd_checks_kernel", "_dkdv_kernel", "_dq_kernel"}
    # 16-bit forwards on sm_90 run the warp-specialised Gluon kernel (kernels/forward_sm90.py), and
    # so does dq in 128-query programs (kernels/dq_sm90.py; the bf16 d128 default)
    gluon = (train - {"_fwd_kernel"}) | {"_fwd_sm90_kernel"}
    gluon_dq = (gluon - {"_dq_kernel"}) | {"_dq_sm90_kernel"}
    assert by_call == {
        "bf16 d128 MHA": gluon_dq,
        "bf16 d128 MHA, Triton forward": train,
        "bf16 d128 MHA, dk/dv FULL_M 64": gluon,
        "bf16 d128 MHA, Triton dq": gluon,
        "fp16 d64 GQA 4:1, patterns": gluon,
        "fp16 d64 GQA 4:1, patterns, Gluon dq": gluon_dq,
        "fp32 d64 GQA 2:1": train,
        "fp32 d128 MHA": train,
        "decode bf16 d128 GQA 3:1, patterns": {"_decode_kernel"},
        "decode fp16 d64 MHA, one query, one split": {"_decode_kernel"},
    }

