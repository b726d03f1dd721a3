"""The warp-specialised Gluon dq kernel (kernels/dq_sm90.py) on an sm_90 GPU.

On such a GPU it computes dq for every 16-bit backward with 128-query dq programs (the bf16
head-dim-128 default), so the kernel suite's backward tests (test_kernels.py and the rest) already
run through it there; these tests pin what is particular to it: that it is the kernel taken, that
it computes what the Triton dq computes on honest plans (FULL, PARTIAL and mixed runs, patterns,
GQA, ragged batches, head dims 64 and 128), and that its own untrusted path keeps forbidden NaN,
Inf and huge values away from protected rows' dq when a plan is forged after check_plan. Without an
sm_90 GPU they skip; tests/test_kernels_compile.py compiles the kernel for sm_90a on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import domainguard as dg
from domainguard.attention import GuardedAttention, KernelConfig, attention_reference, default_config
from test_forward_sm90 import CASES, compiled, patterned  # noqa: F401 (the Gluon forward's fixtures and cases)
from test_kernels import _forged_runs, _forgery_case, _ids, _qkv, _rel_err

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
DEV = torch.device("cuda")
# 128-query dq programs: the Gluon dq where the GPU is sm_90 (any head dim it supports)
DQ128 = (("SUB_M", 128), ("SUB_N", 64), ("num_warps", 8), ("num_stages", 3))
GLUON_DQ = KernelConfig(dq=DQ128)
TRITON_DQ = KernelConfig(dq=DQ128, dq_gluon=False)


@pytest.fixture
def dq_calls(monkeypatch):
    """Counts launches of the Gluon dq kernel."""
    mod = importlib.import_module("domainguard.kernels.dq_sm90")
    calls = []
    real = mod.launch_dq_sm90
    monkeypatch.setattr(mod, "launch_dq_sm90", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _grads(guard, q, k, v, layout, do, plan=None):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = guard(q, k, v, layout, 0, plan=plan)
    return torch.autograd.grad(out, (q, k, v), do)


def test_hopper_bf16_d128_backward_takes_the_gluon_dq(compiled, dq_calls):
    n = 700
    layout = dg.Layout.from_ids(compiled, _ids(1, n, seed=2)).to(DEV)
    q, k, v = _qkv(1, 2, 2, n, 128, torch.bfloat16, seed=2)
    do = torch.randn_like(q)
    dq, dk, dv = _grads(GuardedAttention(compiled), q, k, v, layout, do)
    assert dq_calls == [1]
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = torch.autograd.grad(attention_reference(qf, kf, vf, layout, compiled, 0), (qf, kf, vf), do.float())
    for name, g, r in zip("qkv", (dq, dk, dv), ref):
        assert _rel_err(g, r) < 3e-2, name
    # the Triton dq when asked for, with 64-query dq programs, and for fp32
    _grads(GuardedAttention(compiled, dataclasses.replace(default_config(torch.bfloat16, 128), dq_gluon=False)),
           q, k, v, layout, do)
    _grads(GuardedAttention(compiled, KernelConfig()), q, k, v, layout, do)
    _grads(GuardedAttention(compiled), q.float(), k.float(), v.float(), layout, do.float())
    assert dq_calls == [1]


@pytest.mark.parametrize("dtype,hd,hq,hkv,b,n", CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("policy", ["kernel-test", "clinical"])
@pytest.mark.parametrize("stages", [3, 2], ids=["3-slots", "2-slots"])
def test_gluon_and_triton_dq_agree(compiled, patterned, policy, dtype, hd, hq, hkv, b, n, stages, dq_calls):
    """Same tables, same dS: the two dq kernels agree row by row up to the order of their fp32 sums
    (with either ring of K/V slots), and both match the reference; dk/dv (the Triton kernel either
    way) is the same to the bit."""
    comp = compiled if policy == "kernel-test" else patterned
    ids = _ids(b, n, seed=hd + n, d=comp.num_domains)
    if b > 1:
        ids[1, -37:] = comp.pad_id
    layout = dg.Layout.from_ids(comp, ids).to(DEV)
    q, k, v = _qkv(b, hq, hkv, n, hd, dtype, seed=n)
    do = torch.randn_like(q)
    ours = _grads(GuardedAttention(comp, KernelConfig(dq=DQ128 + (("GLUON_STAGES", stages),))), q, k, v, layout, do)
    theirs = _grads(GuardedAttention(comp, TRITON_DQ), q, k, v, layout, do)
    assert dq_calls == [1]
    real = (ids != comp.pad_id).to(DEV)[:, None, :, None]
    assert torch.isfinite(ours[0]).all()
    # per row: a tile dropped or doubled in one row shows there, whatever the largest row holds
    row_err = (ours[0] - theirs[0]).float().abs().amax(-1) / theirs[0].float().abs().amax(-1).clamp_min(1e-3)
    assert row_err[real[..., 0].expand_as(row_err)].max().item() <= 2e-2, "dq"
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2]), "dk/dv"
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = torch.autograd.grad(attention_reference(qf, kf, vf, layout, comp, 0), (qf, kf, vf), do.float())
    assert _rel_err(ours[0] * real, ref[0] * real) < 3e-2


POISONS = {"nan_inf": (float("nan"), float("inf")), "huge_neginf": (1e30, float("-inf"))}


@pytest.mark.parametrize("forgery,check_full", [
    ("every_tile_full", True),  # (unchecked FULL tiles are trusted as listed: check_full=False is not a defence)
    ("all_partial", True), ("all_partial", False),
    ("honest_full_plus_partial", True), ("honest_full_plus_partial", False),
])
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("hd", [128, 64])
def test_gluon_dq_keeps_forged_plans_exact(compiled, forgery, check_full, poison, hd, dq_calls, monkeypatch):
    """A plan forged after check_plan: every key tile claimed FULL, or listed PARTIAL. With the
    tables checked, the query-side check finds a tile the query tile may not read and the Gluon dq
    walks that query tile on its untrusted path (K selected); unchecked, every PARTIAL tile does.
    Either way poisoned secret keys (K and V NaN/+Inf, or 1e30/-Inf) leave every other row's dq
    bitwise unchanged and finite, and the forgeries that add no allowed pair give the honest dq."""
    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(
        compiled, dataclasses.replace(GLUON_DQ, check_full=check_full), 600, seed=31, qkv_seed=8, heads=2,
        dtype=torch.bfloat16, head_dim=hd)
    forged = dataclasses.replace(plan, runs=_forged_runs(plan, forgery))
    do = torch.randn_like(q)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, secret], v2[:, :, secret] = POISONS[poison]
    clean = _grads(guard, q, k, v, layout, do, plan=forged)
    poisoned = _grads(guard, q, k2, v2, layout, do, plan=forged)
    honest = _grads(guard, q, k, v, layout, do)
    assert len(dq_calls) == 3
    keep = ~secret
    assert torch.isfinite(poisoned[0][:, :, keep]).all()
    assert torch.equal(clean[0][:, :, keep], poisoned[0][:, :, keep])
    if forgery != "honest_full_plus_partial":  # (that one lists some tiles twice)
        assert _rel_err(clean[0][:, :, keep], honest[0][:, :, keep]) < 1e-2
