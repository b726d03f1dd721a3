"""The warp-specialised Gluon forward (kernels/forward_sm90.py) on an sm_90 GPU.

On such a GPU it is the forward every 16-bit call with the default tiles takes, so the whole
kernel suite (test_kernels.py and the rest) already runs through it; these tests pin what is
particular to it: that it is the kernel taken, that it computes what the Triton forward computes
on honest plans (FULL, PARTIAL and mixed runs, patterns, GQA, ragged batches), and that its own
untrusted path keeps forbidden NaN/Inf away from protected rows when a plan is forged after
check_plan. Without an sm_90 GPU they skip; tests/test_kernels_compile.py compiles the kernel
for sm_90a on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import domainguard as dg
from domainguard.attention import GuardedAttention, KernelConfig, attention_reference
from test_kernels import POLICY, _forged_runs, _forgery_case, _ids, _poisoned_forwards, _qkv, _rel_err

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
DEV = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]
TRITON_FWD = KernelConfig(fwd_gluon=False)
PER = pytest.mark.parametrize("per", [2, 1], ids=["128-key-steps", "64-key-steps"])


@pytest.fixture(scope="module")
def compiled():
    return dg.compile(dg.loads_policy(POLICY), layers=1)


@pytest.fixture(scope="module")
def patterned():
    return dg.compile(dg.load_policy(REPO / "policies" / "clinical.yaml"))


def test_hopper_16bit_calls_take_the_gluon_forward(compiled, monkeypatch):
    fwd = importlib.import_module("domainguard.kernels.forward_sm90")
    calls = []
    real = fwd.launch_forward_sm90
    monkeypatch.setattr(fwd, "launch_forward_sm90", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    n = 700
    layout = dg.Layout.from_ids(compiled, _ids(1, n, seed=2)).to(DEV)
    q, k, v = _qkv(1, 2, 2, n, 128, torch.bfloat16, seed=2)
    with torch.no_grad():
        out = GuardedAttention(compiled)(q, k, v, layout, 0)
        ref = attention_reference(q.float(), k.float(), v.float(), layout, compiled, 0)
    assert calls == [1]
    assert _rel_err(out, ref) < 3e-2
    with torch.no_grad():  # the Triton forward when asked for, and for fp32
        GuardedAttention(compiled, TRITON_FWD)(q, k, v, layout, 0)
        GuardedAttention(compiled)(q.float(), k.float(), v.float(), layout, 0)
    assert calls == [1]


CASES = [  # (dtype, head dim, Hq, Hkv, batch, n)
    (torch.bfloat16, 128, 2, 2, 1, 1000),
    (torch.bfloat16, 64, 4, 1, 2, 777),  # GQA 4:1, a batch of two layouts, a ragged end
    (torch.float16, 128, 4, 2, 2, 513),
    (torch.float16, 64, 2, 2, 1, 129),
]


@PER
@pytest.mark.parametrize("dtype,hd,hq,hkv,b,n", CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("policy", ["kernel-test", "clinical"])
def test_gluon_and_triton_forwards_agree(compiled, patterned, policy, dtype, hd, hq, hkv, b, n, per):
    """Same tables, same online softmax in the same order: the two forwards agree to the last bit
    or nearly, and both match the reference."""
    comp = compiled if policy == "kernel-test" else patterned
    ids = _ids(b, n, seed=hd + n, d=comp.num_domains)
    if b > 1:
        ids[1, -37:] = comp.pad_id
    layout = dg.Layout.from_ids(comp, ids).to(DEV)
    q, k, v = _qkv(b, hq, hkv, n, hd, dtype, seed=n)
    with torch.no_grad():
        ours, lse = GuardedAttention(comp, KernelConfig(fwd_gluon_per=per))(q, k, v, layout, 0, return_lse=True)
        theirs, lse_t = GuardedAttention(comp, TRITON_FWD)(q, k, v, layout, 0, return_lse=True)
        ref = attention_reference(q.float(), k.float(), v.float(), layout, comp, 0)
    real = (ids != comp.pad_id).to(DEV)[:, None, :]
    assert (ours - theirs).abs().max().item() <= 2 ** -6, "outputs"
    assert torch.allclose(lse, lse_t, rtol=1e-5, atol=1e-5), "log-sum-exp"
    assert torch.isfinite(ours).all()
    assert _rel_err(ours * real[..., None], ref * real[..., None]) < 3e-2


@pytest.mark.parametrize("forgery,check_full", [
    ("every_tile_full", True),  # (unchecked FULL tiles are trusted as listed: check_full=False is not a defence)
    ("all_partial", True), ("all_partial", False),
    ("honest_full_plus_partial", True), ("honest_full_plus_partial", False),
])
@PER
def test_gluon_forward_keeps_forged_plans_exact(compiled, forgery, check_full, per, monkeypatch):
    """A plan forged after check_plan: every key tile claimed FULL, or listed PARTIAL. With the
    tables checked, the Gluon kernel finds a tile the query tile may not read and walks that query
    tile on its untrusted path (V selected); unchecked, every PARTIAL tile does. Either way a NaN K
    and an Inf V in the secret domain leave every other row's output bitwise unchanged, and the
    forgeries that add no allowed pair change nothing against the honest plan."""
    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    fwd = importlib.import_module("domainguard.kernels.forward_sm90")
    calls = []
    real = fwd.launch_forward_sm90
    monkeypatch.setattr(fwd, "launch_forward_sm90", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(
        compiled, KernelConfig(check_full=check_full, fwd_gluon_per=per), 600, seed=31, qkv_seed=8, heads=2,
        dtype=torch.bfloat16)
    forged = dataclasses.replace(plan, runs=_forged_runs(plan, forgery))
    a, b, honest = _poisoned_forwards(guard, layout, forged, q, k, v, secret)
    assert len(calls) == 3
    keep = ~secret
    assert torch.isfinite(b[:, :, keep]).all()
    assert torch.equal(a[:, :, keep], b[:, :, keep])
    if forgery != "honest_full_plus_partial":  # (that one lists some tiles twice)
        assert _rel_err(a[:, :, keep], honest[:, :, keep]) < 1e-2
