"""attention_reference: the plain-PyTorch ground truth every kernel is compared with."""

import math
import pytest
import torch

import domainguard as dg
from domainguard.attention import attention, attention_reference, reference_from_mask
from domainguard.errors import KernelError

POLICY = """
domainguard: 1
name: ref-test
domains: {a: {}, b: {}, c: {}}
reads: {b: [a]}
patterns: {default: {causal: true}}
"""


def _layout(ids: torch.Tensor, compiled):
    return dg.Layout.from_ids(compiled, ids)


@pytest.fixture(scope="module")
def compiled():
    return dg.compile(dg.loads_policy(POLICY), layers=1)


def _naive(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


def test_matches_naive_softmax(compiled):
    torch.manual_seed(0)
    ids = torch.randint(0, 3, (2, 37))
    lay = _layout(ids, compiled)
    q, k, v = (torch.randn(2, 2, 37, 16) for _ in range(3))
    out = attention_reference(q, k, v, lay, compiled)
    rel = compiled.relation(0)
    idx = torch.arange(37)
    mask = rel[ids[:, :, None], ids[:, None, :]] & (idx[None, None, :] <= idx[None, :, None])
    torch.testing.assert_close(out.double(), _naive(q, k, v, mask[:, None]), rtol=1e-5, atol=1e-5)


def test_fully_masked_row_is_zero_with_finite_lse():
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2] = False
    out, lse = reference_from_mask(q, k, v, mask)
    assert torch.equal(out[0, 0, 2], torch.zeros(8))
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("poison", ["random", "nan", "inf", "-inf", "1e30"])
def test_forbidden_domain_poison_is_invisible(compiled, poison):
    torch.manual_seed(1)
    ids = torch.tensor([[0, 2, 1, 2, 0, 1, 2, 1, 1, 2]])
    lay = _layout(ids, compiled)
    q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
    out = attention_reference(q, k, v, lay, compiled)
    forb = ids[0] == 2  # nobody else reads c
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        fill = torch.randn(1, 2, int(forb.sum()), 16) if poison == "random" else float(poison)
        t[:, :, forb] = fill
    out2 = attention_reference(q2, k2, v2, lay, compiled)
    assert torch.equal(out[:, :, ~forb], out2[:, :, ~forb])


def test_gqa_and_q_slice(compiled):
    torch.manual_seed(2)
    ids = torch.randint(0, 3, (1, 20))
    lay = _layout(ids, compiled)
    q = torch.randn(1, 4, 20, 8)
    k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    full = attention_reference(q, k, v, lay, compiled)
    last = attention_reference(q[:, :, -3:], k, v, lay, compiled, q_slice=3)
    torch.testing.assert_close(last, full[:, :, -3:])


def test_bad_shapes_refused(compiled):
    lay = _layout(torch.zeros(1, 4, dtype=torch.long), compiled)
    with pytest.raises(KernelError) as e:
        attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), lay, compiled)
    assert e.value.code == "DG312"


@pytest.mark.parametrize("poison", ["random", "nan", "inf", "-inf", "1e30"])
def test_forbidden_domain_poison_is_invisible_to_gradients(compiled, poison):
    """c reads only itself and nobody reads c: the gradients of every a and b token (q, k and v) are
    bitwise the same whatever c holds, with an output gradient on every row, c's included."""
    torch.manual_seed(3)
    ids = torch.tensor([[0, 2, 1, 2, 0, 1, 2, 1, 1, 2, 0]])
    lay = _layout(ids, compiled)
    forb = ids[0] == 2
    base = [torch.randn(1, 2, 11, 16) for _ in range(3)]
    dout = torch.randn(1, 2, 11, 16)

    def grads(poisoned: bool, dout=dout):
        ts = [t.clone() for t in base]
        if poisoned:
            for t in ts:
                t[:, :, forb] = torch.randn(1, 2, int(forb.sum()), 16) if poison == "random" else float(poison)
        ts = [t.requires_grad_() for t in ts]
        out = attention_reference(*ts, lay, compiled)
        out.backward(dout)
        return out.detach(), [t.grad for t in ts]

    out, clean = grads(False)
    out2, dirty = grads(True)
    assert torch.equal(out[:, :, ~forb], out2[:, :, ~forb])
    for g, g2 in zip(clean, dirty):
        assert torch.isfinite(g[:, :, ~forb]).all()
        assert torch.equal(g[:, :, ~forb], g2[:, :, ~forb])
    if poison != "random":
        # The poisoned rows' own output gradient is non-finite too (a loss over them): still invisible.
        bad = dout.clone()
        bad[:, :, forb] = float(poison)
        _, dirty = grads(True, bad)
        for g, g2 in zip(clean, dirty):
            assert torch.equal(g[:, :, ~forb], g2[:, :, ~forb])


def test_gradients_still_match_the_naive_ones(compiled):
    torch.manual_seed(4)
    ids = torch.randint(0, 3, (2, 23))
    lay = _layout(ids, compiled)
    ts = [torch.randn(2, 2, 23, 16, requires_grad=True) for _ in range(3)]
    rel = compiled.relation(0)
    idx = torch.arange(23)
    mask = (rel[ids[:, :, None], ids[:, None, :]] & (idx[None, None, :] <= idx[None, :, None]))[:, None]
    dout = torch.randn(2, 2, 23, 16)
    got = torch.autograd.grad(attention_reference(*ts, lay, compiled), ts, dout)
    want = torch.autograd.grad(_naive(*ts, mask), ts, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
