"""Frozen Triton kernels vs the PyTorch reference: outputs, gradients, exactness under poisoning.

On the CPU these run through TRITON_INTERPRET=1 (tests/conftest.py) at small shapes and
tile size 16; with CUDA they run on the GPU at the default tile sizes as well.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import domainguard as dg
from domainguard.attention import GuardedAttention, KernelConfig, attention, attention_reference, default_config
from domainguard.errors import KernelError
from domainguard.kernels.plan import FULL, PARTIAL, Runs, runs_kinds, tile_runs

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

POLICY = """
domainguard: 1
name: kernel-test
domains: {sys: {}, user: {}, tool: {}, secret: {}, answer: {}}
reads:
  user: [sys]
  tool: [sys, user]
  answer: [sys, user, tool]
  secret: {sources: [sys], self: true}
patterns: {default: {causal: true}}
"""
# Nobody reads secret (the "forbidden" domain); secret itself reads sys.
SECRET = 3

LONELY = """
domainguard: 1
name: lonely
domains: {a: {}, b: {}, mute: {}}
reads:
  b: [a]
  mute: {sources: [], self: false}
patterns: {default: {causal: true}, b: {}}
"""

SMALL = KernelConfig(
    block_m=16, block_n=16, num_warps=4, num_stages=1,
    dkdv=(("SUB_N", 16), ("SUB_M", 16), ("num_warps", 4), ("num_stages", 1)),
    dq=(("SUB_M", 16), ("SUB_N", 16), ("num_warps", 4), ("num_stages", 1)),
)
SMALL_PTR = KernelConfig(**{**SMALL.__dict__, "use_tma": False, "dq_tma": False})  # pointer loads, no TMA
# dk/dv programs owning two key tiles (key-major tables merged over 32 keys), as the default does on a GPU
SMALL_KT = KernelConfig(**{**SMALL.__dict__, "dkdv": (("SUB_N", 32), ("SUB_M", 16), ("num_warps", 4), ("num_stages", 1))})
CONFIGS = [SMALL, SMALL_PTR, SMALL_KT] + ([None] if CUDA else [])  # None: the tuned default
CONFIG_IDS = {id(SMALL): "small-tma", id(SMALL_PTR): "small-ptr", id(SMALL_KT): "small-kt32"}


@pytest.fixture(scope="module")
def compiled():
    return dg.compile(dg.loads_policy(POLICY), layers=2)


def _ids(b: int, n: int, seed: int, d: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Short random segments so domain boundaries fall inside tiles of the original order.
    seg = torch.randint(0, d, (b, n // 3 + 1), generator=g)
    return seg.repeat_interleave(3, dim=1)[:, :n]


def _qkv(b, hq, hkv, n, d, dtype, seed, nq=None):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, m: torch.randn(b, h, m, d, generator=g).to(DEV, dtype).requires_grad_(True)  # noqa: E731
    return mk(hq, nq or n), mk(hkv, n), mk(hkv, n)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

CASES = [  # (dtype, head dim, Hq, Hkv)
    (torch.float32, 64, 4, 2),
    (torch.bfloat16, 128, 2, 2),
    (torch.float16, 64, 2, 1),
    (torch.float32, 128, 2, 2),  # its default config has its own tile shape (32 x 64, 8 warps)
]
if CUDA:
    CASES += [(torch.bfloat16, 64, 4, 1), (torch.float16, 128, 8, 2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: CONFIG_IDS.get(id(c), "default"))
@pytest.mark.parametrize("dtype,hd,hq,hkv", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_backward_match_reference(compiled, cfg, dtype, hd, hq, hkv):
    n = 45 if not CUDA else (45 if cfg is SMALL else 700)
    ids = _ids(2, n, seed=hd + hq)
    ids[1, -7:] = compiled.pad_id  # a shorter second row: a batch of different layouts
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    guard = GuardedAttention(compiled, cfg)
    q, k, v = _qkv(2, hq, hkv, n, hd, dtype, seed=1)
    out, lse = guard(q, k, v, layout, 1, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, layout, compiled, 1, return_lse=True)
    assert _rel_err(out, ref) < TOL[dtype]
    assert torch.allclose(lse, ref_lse, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _rel_err(g, r) < TOL[dtype] * 2, name


@pytest.mark.parametrize("full_m", [32, 16], ids=["full32", "full16"])
def test_dkdv_full_runs_in_steps_of_their_own_match_reference(compiled, full_m, monkeypatch):
    """``FULL_M`` (dk/dv's unmasked FULL runs stepped by a row count other than the masked steps'
    SUB_M; ``benchmarks/attention.py``'s ``dkdv_full64`` sweep): 32-query tiles walked 32 rows at a
    time where the masked runs take 16, with and without a pipeline depth of their own, on a layout
    with trusted FULL runs; the gradients match the reference, the launch passes both entries to the
    kernel, and FULL_M 16 gives the same bits as a config that does not name it (the default: SUB_M),
    each with its own plan (the backward takes its config from the plan)."""
    from domainguard.kernels import backward

    class Spy:  # the keyword arguments of each dk/dv launch
        def __init__(self, kernel):
            self.kernel, self.seen = kernel, []

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                self.seen.append(kwargs)
                return launch(*args, **kwargs)
            return run

    spy = Spy(backward._dkdv_kernel)
    monkeypatch.setattr(backward, "_dkdv_kernel", spy)
    base = dict(block_m=32, block_n=16, num_warps=4, num_stages=1, use_tma=False, dq_tma=False,
                dq=(("SUB_M", 16), ("SUB_N", 16), ("num_warps", 4), ("num_stages", 1)))
    dkdv = (("SUB_N", 16), ("SUB_M", 16), ("num_warps", 4), ("num_stages", 1))
    cfg = KernelConfig(**base, dkdv=dkdv + (("FULL_M", full_m), ("FULL_STAGES", 2)))
    n = 96
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 3, (1, n // 24), generator=g).repeat_interleave(24, dim=1)  # long runs: FULL tiles
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    guard = GuardedAttention(compiled, cfg)
    plan = guard.plan(layout, 1, heads=2, dtype=torch.float32, head_dim=64)
    assert int(plan.runs_t[0].num.sum()) > 0, "no key-major FULL runs: the FULL loop would not run"
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=6)
    out = guard(q, k, v, layout, 1, plan=plan)
    ref = attention_reference(q, k, v, layout, compiled, 1)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, gr, r in zip("qkv", grads, torch.autograd.grad(ref, (q, k, v), do)):
        assert _rel_err(gr, r) < TOL[torch.float32] * 2, name
    assert [(kw["FULL_M"], kw["FULL_STAGES"]) for kw in spy.seen] == [(full_m, 2)]
    if full_m == 16:
        plain = GuardedAttention(compiled, KernelConfig(**base, dkdv=dkdv))
        out2 = plain(q, k, v, layout, 1, plan=plain.plan(layout, 1, heads=2, dtype=torch.float32, head_dim=64))
        for name, gr, r in zip("qkv", grads, torch.autograd.grad(out2, (q, k, v), do)):
            assert torch.equal(gr, r), name
        assert [(kw["FULL_M"], kw["FULL_STAGES"]) for kw in spy.seen[1:]] == [(16, 1)]


def test_float32_default_config_at_head_dim_128_matches_reference(compiled):
    """fp32 at head dim 128 has a tile shape of its own (32 x 64 tiles, 8 warps: see
    default_config); the CPU runs it too, with more query tiles than one and a ragged end."""
    n = 75
    ids = _ids(1, n, seed=11)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 2, 1, n, 128, torch.float32, seed=4)
    guard = GuardedAttention(compiled)
    out = guard(q, k, v, layout, 1)
    ref = attention_reference(q, k, v, layout, compiled, 1)
    assert _rel_err(out, ref) < TOL[torch.float32]
    do = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert _rel_err(g, r) < TOL[torch.float32] * 2, name


def test_launch_order_takes_heavy_tiles_first():
    """Tiles by work (2 per FULL tile, 3 per PARTIAL, 2 per run, summed over heads), ties later first."""
    from domainguard.kernels.plan import EMPTY, launch_order

    F, P, E = FULL, PARTIAL, EMPTY
    kinds = torch.tensor([[[  # [B=1, H=2, T=4, U=5]
        [F, E, E, E, E],  # 2 + 2 (one run)            = 4
        [F, F, P, E, E],  # 4 + 3 + 2 runs * 2         = 11
        [P, E, F, E, P],  # 3 + 3 + 2 + 3 runs * 2     = 14
        [F, E, F, E, E],  # 4 + 2 runs * 2             = 8
    ], [
        [F, E, E, E, E],  # 4 again
        [E, E, E, E, E],  # 0
        [E, E, E, E, E],  # 0
        [F, E, F, E, E],  # 8 again
    ]]], dtype=torch.uint8)
    order = launch_order(tile_runs(kinds, FULL), tile_runs(kinds, PARTIAL))
    # totals 8, 11, 14, 16
    assert order.dtype == torch.int32 and order.tolist() == [[3, 2, 1, 0]]
    ties = torch.full((1, 1, 3, 2), FULL, dtype=torch.uint8)
    assert launch_order(tile_runs(ties, FULL), tile_runs(ties, PARTIAL)).tolist() == [[2, 1, 0]]


def test_pick_head_group_divides_the_heads_and_fits_half_the_l2():
    from domainguard.kernels.forward import _L2_DEFAULT, pick_head_group

    cpu = torch.device("cpu")
    assert pick_head_group(16, 4 * 2**20, cpu) == 4  # 25 MiB / 4 MiB = 6 -> the divisor 4
    assert pick_head_group(16, 16 * 2**20, cpu) == 1
    assert pick_head_group(16, 64 * 2**20, cpu) == 1  # more than the L2 holds: one head at a time
    assert pick_head_group(12, 1, cpu) == 12
    assert pick_head_group(12, _L2_DEFAULT // 10, cpu) == 4  # 5 fit; 4 divides 12
    assert pick_head_group(16, 1, cpu, want=3) == 2
    assert pick_head_group(16, 1, cpu, want=64) == 16


# Tiles split into sub-blocks on both sides: dq programs own half a query tile, dk/dv programs half a
# key block, and the flat dk/dv loop steps twice per query tile (the GPU default splits them too).
SPLIT = KernelConfig(
    block_m=32, block_n=32, num_warps=4, num_stages=1,
    dkdv=(("SUB_N", 16), ("SUB_M", 16), ("num_warps", 4), ("num_stages", 1)),
    dq=(("SUB_M", 16), ("SUB_N", 16), ("num_warps", 4), ("num_stages", 1)),
)


@pytest.mark.parametrize("head_group", [1, 2, 4])
def test_results_do_not_depend_on_the_launch_schedule(compiled, head_group):
    """Any head grouping and any launch order of the tiles give the same bits: outputs and
    gradients, GQA, a batch of two layouts, with the reference's values. (Each program owns its
    outputs; nothing is accumulated across programs, so the schedule can only change which program
    runs when.) Segments of 40 tokens fill whole sub-blocks, so a program mapped to the wrong half
    of its tile, or a loop stepping a whole tile, changes the results."""
    n = 150 if not CUDA else 900
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 5, (2, n // 40 + 1), generator=g).repeat_interleave(40, dim=1)[:, :n]
    ids[1, -9:] = compiled.pad_id
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    cfg = SPLIT if not CUDA else default_config(torch.bfloat16, 64)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    q, k, v = _qkv(2, 4, 2, n, 64, dtype, seed=8)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEV, dtype)
    base = GuardedAttention(compiled, dataclasses.replace(cfg, head_group=1))
    plan = base.plan(layout, 1, heads=4, dtype=dtype, head_dim=64)
    assert plan.order[0].tolist() != list(range(plan.order.shape[1] - 1, -1, -1))  # not the slot order

    def run(guard, p):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = guard(qq, kk, vv, layout, 1, plan=p)
        return (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), do))

    want = run(base, plan)
    ref = attention_reference(q, k, v, layout, compiled, 1)
    ref_all = (ref, *torch.autograd.grad(ref, (q, k, v), do))
    for name, a, r in zip(("out", "dq", "dk", "dv"), want, ref_all):
        assert _rel_err(a, r) < TOL[dtype] * 2, name
    g = torch.Generator().manual_seed(head_group)
    shuffled = dataclasses.replace(
        plan, config=dataclasses.replace(plan.config, head_group=head_group),
        order=torch.stack([r[torch.randperm(r.numel(), generator=g).to(r.device)] for r in plan.order]),
        order_t=torch.stack([r[torch.randperm(r.numel(), generator=g).to(r.device)] for r in plan.order_t]),
    )
    guard = GuardedAttention(compiled, dataclasses.replace(cfg, head_group=head_group))
    for name, a, b in zip(("out", "dq", "dk", "dv"), want, run(guard, shuffled)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("poison,cfg", [("random", SMALL), ("nan", SMALL), ("inf", SMALL), ("-inf", SMALL),
                                        ("1e30", SMALL), ("nan", SMALL_KT), ("1e30", SMALL_KT)],
                         ids=lambda x: CONFIG_IDS.get(id(x), x))
def test_poisoned_forbidden_domain_is_invisible(compiled, poison, cfg):
    """Outputs and gradients of tokens that cannot depend on `secret` are bitwise unchanged."""
    n = 48 if not CUDA else 600
    ids = _ids(1, n, seed=7)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    guard = GuardedAttention(compiled, cfg if not CUDA else None)
    dtype = torch.bfloat16
    q, k, v = _qkv(1, 2, 2, n, 64, dtype, seed=3)
    do = torch.randn(1, 2, n, 64).to(DEV, dtype)
    secret = (ids[0] == SECRET).to(DEV)
    assert 0 < int(secret.sum()) < n

    def run(q, k, v):
        out = guard(q, k, v, layout, 0)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    clean = run(q, k, v)
    pq, pk, pv = (t.detach().clone() for t in (q, k, v))
    for t in (pq, pk, pv):
        fill = torch.randn(t.shape[0], t.shape[1], int(secret.sum()), t.shape[3]) * 1e3 if poison == "random" else float(poison)
        t[:, :, secret] = fill.to(DEV, dtype) if isinstance(fill, torch.Tensor) else fill
    dirty = run(*(t.requires_grad_(True) for t in (pq, pk, pv)))
    # dk/dv of a key legitimately depend on the queries that read it: secret reads sys.
    read_by_secret = secret | (ids[0] == 0).to(DEV)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        keep = ~read_by_secret if name in ("dk", "dv") else ~secret
        assert torch.equal(a[:, :, keep], b[:, :, keep]), name
        assert torch.isfinite(a[:, :, keep]).all(), name


def _captured(fn):
    """``fn`` captured once in a CUDA graph after a warm-up on a side stream (plans, checks and
    compiles happen there, as CUDA graphs require); returns (graph, what fn returned in capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the warm-up's stream: autograd's nodes were made there
        res = fn()
    return graph, res


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["forward", "forward+backward", "decode"])
def test_guarded_call_replays_in_a_cuda_graph(compiled, mode):
    """A guarded call captured once in a CUDA graph, replayed on new inputs written into the same
    tensors: the same bits as an eager call on those inputs, and a poisoned forbidden domain stays
    invisible to protected outputs and gradients under replay."""
    n, hq, hkv, d, new = 900, 4, 2, 128, 5
    ids = _ids(1, n, seed=29)
    if mode == "decode":
        ids[0, -new:] = 4  # the new tokens are `answer`
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    guard = GuardedAttention(compiled)
    nq = new if mode == "decode" else n
    q, k, v = (t.detach() for t in _qkv(1, hq, hkv, n, d, torch.bfloat16, seed=31, nq=nq))
    do = torch.randn(1, hq, nq, d).to(DEV, torch.bfloat16)
    qsl = new if mode == "decode" else None
    backward = mode == "forward+backward"
    for t in (q, k, v):
        t.requires_grad_(backward)

    def call(q, k, v):
        if not backward:
            with torch.no_grad():
                return guard(q, k, v, layout, 1, q_slice=qsl), ()
        for t in (q, k, v):
            t.grad = None
        out = guard(q, k, v, layout, 1, q_slice=qsl)
        out.backward(do)
        return out, (q.grad, k.grad, v.grad)

    graph, (out, grads) = _captured(lambda: call(q, k, v))
    secret = (ids[0] == SECRET).to(DEV)
    results = []
    for seed, poison in ((41, None), (41, float("nan")), (43, None)):
        fresh = _qkv(1, hq, hkv, n, d, torch.bfloat16, seed=seed, nq=nq)
        with torch.no_grad():
            for t, f in zip((q, k, v), fresh):
                t.copy_(f)
                if poison is not None:
                    t[:, :, secret[-t.shape[2]:]] = poison
        graph.replay()
        got = (out.clone(), *(g.clone() for g in grads))
        eager_out, eager_grads = call(*(t.detach().clone().requires_grad_(backward) for t in (q, k, v)))
        eager = (eager_out, *eager_grads)
        for a, b in zip(got, eager):  # replay == eager, bit for bit (poisoned rows' NaNs included)
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        results.append(got)
    (clean, dirty, other) = results
    assert not torch.equal(clean[0], other[0])  # the replay really ran on the new inputs
    q_keep = ~secret[-nq:]
    # Gradients: dk/dv of keys read by secret (secret reads sys) legitimately change.
    k_keep = ~(secret | (ids[0] == 0).to(DEV))
    assert torch.equal(clean[0][:, :, q_keep], dirty[0][:, :, q_keep])
    assert torch.isfinite(clean[0][:, :, q_keep]).all()
    if backward:
        assert torch.equal(clean[1][:, :, q_keep], dirty[1][:, :, q_keep])
        for a, b in zip(clean[2:], dirty[2:]):
            assert torch.equal(a[:, :, k_keep], b[:, :, k_keep])


@pytest.mark.skipif(not CUDA, reason="streams need a GPU")
def test_backward_on_a_side_stream_gives_the_same_bits_on_the_callers_stream(compiled):
    """dq runs on a side stream beside dk/dv (``bwd_concurrent``). Called from a stream of the
    caller's own, the gradients read right after ``backward`` on that stream are the bits of the
    one-stream backward, every time."""
    n, hq, hkv, d = 1500, 4, 2, 128
    layout = dg.Layout.from_ids(compiled, _ids(1, n, seed=47)).to(DEV)
    base = default_config(torch.bfloat16, d)
    q, k, v = (t.detach() for t in _qkv(1, hq, hkv, n, d, torch.bfloat16, seed=53))
    do = torch.randn(1, hq, n, d).to(DEV, torch.bfloat16)

    def grads(concurrent):
        guard = GuardedAttention(compiled, dataclasses.replace(base, bwd_concurrent=concurrent))
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        guard(qq, kk, vv, layout, 1).backward(do)
        return torch.cat([t.grad.flatten() for t in (qq, kk, vv)])  # read on the caller's stream

    one = grads(False)
    caller = torch.cuda.Stream()
    caller.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(caller):
        side = [grads(True) for _ in range(5)]
    torch.cuda.current_stream().wait_stream(caller)
    for got in side:
        assert torch.equal(got.view(torch.int16), one.view(torch.int16))
    assert one.abs().sum() > 0


def test_fully_masked_rows_give_zero_and_finite_lse():
    lonely = dg.compile(dg.loads_policy(LONELY), layers=1)
    n = 40
    ids = _ids(1, n, seed=11, d=3)
    layout = dg.Layout.from_ids(lonely, ids).to(DEV)
    q, k, v = _qkv(1, 2, 2, n, 64, torch.float16, seed=5)
    with torch.no_grad():
        v[:, :, ids[0].to(DEV) == 2] = float("nan")
    out, lse = GuardedAttention(lonely, SMALL)(q, k, v, layout, return_lse=True)
    mute = ids[0].to(DEV) == 2
    assert torch.equal(out[:, :, mute], torch.zeros_like(out[:, :, mute]))
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    ref = attention_reference(q, k, v, layout, lonely)
    assert _rel_err(out, ref) < 5e-3


def test_q_slice_prefill_chunk_matches_reference(compiled):
    n, m = 50, 19
    ids = _ids(1, n, seed=13)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=9, nq=m)
    guard = GuardedAttention(compiled, SMALL_PTR)
    out = guard(q, k, v, layout, 0, q_slice=m)
    ref = attention_reference(q, k, v, layout, compiled, 0, q_slice=m)
    assert _rel_err(out, ref) < 1e-4


def test_forged_full_tiles_cannot_widen_the_relation(compiled, monkeypatch):
    """A plan claiming every tile FULL is not trusted at domain level inside the kernel, even
    past check_plan (which refuses it first, DG319); without the in-kernel check it would leak."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)

    n = 48
    ids = _ids(1, n, seed=17)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    secret = (ids[0] == SECRET).to(DEV)
    q, k, v = _qkv(1, 1, 1, n, 64, torch.float32, seed=2)

    def leaks(check_full: bool) -> bool:
        guard = GuardedAttention(compiled, dataclasses.replace(SMALL, check_full=check_full))
        plan = guard.plan(layout, 0, heads=1, dtype=q.dtype, head_dim=64)
        forged = dataclasses.replace(plan, runs=_every_tile_full(plan))
        with torch.no_grad():
            a = guard(q, k, v, layout, 0, plan=forged)
            v2 = v.detach().clone()
            v2[:, :, secret] = 1e4
            b = guard(q, k, v2, layout, 0, plan=forged)
        return not torch.equal(a[:, :, ~secret], b[:, :, ~secret])

    assert not leaks(check_full=True)
    assert leaks(check_full=False)  # the test can fail: without the in-kernel check the forgery leaks


def _every_tile_full(plan):
    """Run tables claiming every key tile FULL for every query tile (the strongest forgery)."""
    full, part = plan.runs
    one = torch.ones_like(full.num)
    tk = plan.ks.size // plan.config.block_n
    return Runs(num=one, start=torch.zeros_like(one)[..., None], end=(one * tk)[..., None]), \
        Runs(num=torch.zeros_like(one), start=part.start, end=part.end)


def _forged_runs(plan, forgery: str):
    """(full, partial) run tables past check_plan: ``every_tile_full`` (``_every_tile_full``),
    ``all_partial`` (every key tile listed PARTIAL, none FULL) or ``honest_full_plus_partial`` (the
    honest FULL runs stay; every key tile is listed PARTIAL as well)."""
    every, none = _every_tile_full(plan)
    if forgery == "every_tile_full":
        return every, none
    if forgery == "all_partial":
        return Runs(num=torch.zeros_like(every.num), start=every.start, end=every.end), every
    assert forgery == "honest_full_plus_partial", forgery
    return plan.runs[0], every


def _relabelled(slots, tokens_from, dom):
    import dataclasses

    d = slots.dom.clone()
    d[(slots.tok >= 0) & tokens_from] = dom
    return dataclasses.replace(slots, dom=d)


def _swapped(slots, a: int, b: int):
    """``slots`` (batch row 0) with the tokens of slots ``a`` and ``b`` exchanged, labels travelling
    with their tokens: honest labels in a forged order."""
    import dataclasses

    perm = torch.arange(slots.size, device=slots.tok.device)
    perm[a], perm[b] = b, a
    return dataclasses.replace(slots, **{f: getattr(slots, f)[:, perm].contiguous() for f in ("tok", "dom", "idx", "rank")})


def _mixed(slots, secret_tok, block):
    """Honest labels, forged order: a secret token's slot swapped into the second slot of a
    `sys` tile (the tile's first slot, the one the kernel's FULL check reads, stays `sys`)."""
    tok, dom = slots.tok[0], slots.dom[0]
    s_slot = int(((tok >= 0) & secret_tok[0][tok.clamp(min=0).long()]).nonzero()[0])
    starts = [t for t in range(0, slots.size, block) if int(dom[t]) == 0 and int(tok[t + 1]) >= 0 and int(dom[t + 1]) == 0]
    return _swapped(slots, s_slot, starts[0] + 1)


def _planned_48(compiled):
    """A 48-token layout of short segments, one-head q/k/v, a guard and its plan for layer 0."""
    ids = _ids(1, 48, seed=17)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 1, 1, 48, 64, torch.float32, seed=2)
    guard = GuardedAttention(compiled, SMALL)
    return ids, layout, (q, k, v), guard, guard.plan(layout, 0, heads=1, dtype=q.dtype, head_dim=64)


def _swap_secret_key_slot(tok, dom) -> None:
    """Point a readable key slot at a secret token (and the secret slot at its token); labels untouched."""
    secret_slot = int(((dom == SECRET) & (tok >= 0)).nonzero()[0])
    other_slot = int(((dom != SECRET) & (tok >= 0)).nonzero()[0])
    a, b = int(tok[other_slot]), int(tok[secret_slot])
    tok[other_slot], tok[secret_slot] = b, a


def test_a_plan_changed_in_place_after_its_first_use_is_checked_again(compiled):
    """The check of a given plan is remembered; an in-place edit afterwards (a readable key slot pointed at a
    secret token) must not ride on it."""
    _, layout, (q, k, v), guard, plan = _planned_48(compiled)
    with torch.no_grad():
        guard(q, k, v, layout, 0, plan=plan)  # checked, and the check remembered
    _swap_secret_key_slot(plan.ks.tok[0], plan.ks.dom[0])
    with pytest.raises(KernelError) as e, torch.no_grad():
        guard(q, k, v, layout, 0, plan=plan)
    assert e.value.code == "DG319"


def test_writes_to_a_checked_plan_that_no_version_counter_sees_never_reach_the_kernels(compiled):
    """The kernels run a private copy of the plan made when it was checked: a write through .data (which
    leaves the version counter alone) changes the caller's tensors, not what runs."""
    ids, layout, (q, k, v), guard, plan = _planned_48(compiled)
    secret = (ids[0] == SECRET).to(DEV)
    with torch.no_grad():
        clean = guard(q, k, v, layout, 0, plan=plan)
    _swap_secret_key_slot(plan.ks.tok.data[0], plan.ks.dom[0])
    v2 = v.clone()
    v2[:, :, secret] = float("nan")
    with torch.no_grad():
        got = guard(q, k, v2, layout, 0, plan=plan)
    assert torch.equal(got[:, :, ~secret], clean[:, :, ~secret])


def test_a_layout_relabelled_in_place_gets_a_new_plan(compiled):
    """Plans are cached per layout; tokens relabelled secret in place after a call must not run on the old plan
    (which files them under a domain others read)."""
    n = 48
    ids = torch.tensor([[0] * 8 + [1] * 8 + [0] * 8 + [1] * 8 + [4] * 16])  # sys, user, sys, user, answer
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 1, 1, n, 64, torch.float32, seed=2)
    guard = GuardedAttention(compiled, SMALL)
    with torch.no_grad():
        guard(q, k, v, layout, 0)  # plans this layout
    layout.domain_ids[0, 16:24] = SECRET  # sys tokens every other domain reads become secret
    secret = layout.domain_ids[0] == SECRET
    v2 = v.clone()
    v2[:, :, secret] = float("nan")
    with torch.no_grad():
        got = guard(q, k, v2, layout, 0)
        want = attention_reference(q, k, v2, layout, compiled, 0)
    assert torch.isfinite(got[:, :, ~secret]).all()
    torch.testing.assert_close(got[:, :, ~secret], want[:, :, ~secret], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("forgery", ["relabel", "mixed_tile"])
def test_forged_plan_slots_are_refused(compiled, forgery, monkeypatch):
    """A plan that relabels secret tokens or hides one in a readable tile is refused (DG319);
    the same plan leaks when the check is switched off, so the test can fail."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")  # the package re-exports a function of that name

    ids, layout, (q, k, v), guard, plan = _planned_48(compiled)
    secret = (ids == SECRET).to(DEV)
    if forgery == "relabel":
        ks = _relabelled(plan.ks, secret[0][plan.ks.tok.clamp(min=0).long()], 0)
    else:
        ks = _mixed(plan.ks, secret, SMALL.block_n)
    forged = dataclasses.replace(plan, ks=ks, runs=_every_tile_full(plan))

    def outputs(v_):
        with torch.no_grad():
            return guard(q, k, v_, layout, 0, plan=forged)

    v2 = v.detach().clone()
    v2[:, :, secret[0]] = 1e4
    with pytest.raises(KernelError) as e:
        outputs(v)
    assert e.value.code == "DG319" and "layout" in str(e.value)
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    assert not torch.equal(outputs(v)[:, :, ~secret[0]], outputs(v2)[:, :, ~secret[0]])


@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR], ids=["tma", "ptr"])
def test_forged_full_tiles_cannot_see_the_future(compiled, cfg, monkeypatch):
    """Honest slots, but run tables that mark every later key tile of a query tile's own domain
    FULL: the domains are readable, so the kernels' FULL-tile domain check lets them through and
    queries would read future tokens. check_plan re-derives the tile tables and refuses (DG319);
    with that check switched off an early token's output does change with a later token's V."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    n = 64
    ids = _ids(1, n, seed=41)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 1, 1, n, 64, torch.float32, seed=9)
    guard = GuardedAttention(compiled, cfg)
    plan = guard.plan(layout, 0, heads=1, dtype=q.dtype, head_dim=64)
    bm, bn = cfg.block_m, cfg.block_n
    tq, tk = plan.qs.size // bm, plan.ks.size // bn
    kinds = runs_kinds(*plan.runs, tk)
    q_dom = plan.qs.dom.view(1, tq, bm)[..., 0]
    k_dom = plan.ks.dom.view(1, tk, bn)[..., 0]
    same = (q_dom[:, :, None] == k_dom[:, None, :])[:, None]  # [B, 1, Tq, Tk]
    forged_kinds = torch.where(same, torch.full_like(kinds, FULL), kinds)
    assert not torch.equal(forged_kinds, kinds)  # the forgery adds FULL tiles
    forged = dataclasses.replace(
        plan, runs=(tile_runs(forged_kinds, FULL), tile_runs(forged_kinds, PARTIAL)))
    late = plan.ks.tok[0][plan.ks.tok[0] >= 0].long()
    v2 = v.detach().clone()
    v2[:, :, late.max()] += 100.0  # the last token: in every earlier query's future

    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, plan=forged)
    assert e.value.code == "DG319" and "tile table" in str(e.value) and "FULL" in str(e.value)
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    with torch.no_grad():
        a, b = guard(q, k, v, layout, 0, plan=forged), guard(q, k, v2, layout, 0, plan=forged)
        honest_a, honest_b = guard(q, k, v, layout, 0, plan=plan), guard(q, k, v2, layout, 0, plan=plan)
    early = slice(0, n - 1)
    assert torch.equal(honest_a[:, :, early], honest_b[:, :, early])
    assert not torch.equal(a[:, :, early], b[:, :, early])


def _decode_case(compiled, new=2):
    n = 60
    ids = _ids(1, n, seed=29)
    ids[0, -new:] = 4  # the new queries are `answer`, which may not read secret
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    secret = (ids == SECRET).to(DEV)
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=3, nq=new)
    v2 = v.detach().clone()
    v2[:, :, secret[0]] = 1e4
    return layout, q, k, v, v2


@pytest.mark.parametrize("new", [1, 2])
def test_forged_decode_labels_are_refused(compiled, monkeypatch, new):
    """A decode plan whose query slots claim the `answer` queries are `secret` (which reads secret)
    is refused (DG319) before any kernel runs; with that check switched off the same plan lets
    secret values through, so the refusal is what stops it. Key labels are not in a decode plan
    at all: the kernel reads them from the layout."""
    att = importlib.import_module("domainguard.attention")  # the package re-exports a function of that name

    layout, q, k, v, v2 = _decode_case(compiled, new)
    guard = GuardedAttention(compiled)
    plan = guard.decode_plan(layout, 0, new, heads=2, kv_heads=1)
    forged = dataclasses.replace(plan, qs=dataclasses.replace(plan.qs, dom=torch.full_like(plan.qs.dom, SECRET)))
    run = lambda v_, p: guard(q, k, v_, layout, 0, q_slice=new, plan=p)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(run(v, plan), run(v2, plan))  # the honest plan runs and is exact
        with pytest.raises(KernelError) as e:
            run(v, forged)
    assert e.value.code == "DG319" and "query slot domains differ from the layout's" in str(e.value)
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    with torch.no_grad():
        assert not torch.equal(run(v, forged), run(v2, forged))


def test_decode_plans_of_another_shape_or_group_are_refused(compiled):
    layout, q, k, v, _ = _decode_case(compiled)
    guard = GuardedAttention(compiled)
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q[:, :, 1:], k, v, layout, 0, q_slice=1, plan=guard.decode_plan(layout, 0, 2, heads=2, kv_heads=1))
    assert e.value.code == "DG318"
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, q_slice=2, plan=guard.decode_plan(layout, 0, 2, heads=4, kv_heads=1))
    assert e.value.code == "DG319" and "GQA groups of 4, not 2" in str(e.value)


def test_one_query_decode_slots_equal_sort_slots(compiled):
    """The sync-free slots of a one-query decode step are sort_slots' own, for every domain and padding."""
    att = importlib.import_module("domainguard.attention")
    from domainguard.kernels.plan import sort_slots

    ids = _ids(3, 40, seed=31)
    ids[1, -1] = compiled.pad_id  # a right-padded row: its query is padding
    ids[2, -1] = SECRET
    layout = dg.Layout.from_ids(compiled, ids)
    for qt in (1, 5, 16):
        qa = layout.attrs(1)
        fast = att._decode_slots(qa, compiled.pad_id, qt)
        slow = sort_slots(qa.domain, qa.index, qa.rank, compiled.pad_id, qt, query=True)
        for name in ("tok", "dom", "idx", "rank"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b), (qt, name)
        assert fast.block == slow.block == qt


def _with_run_past_the_row(runs, b: int, lo: int, hi: int, part: bool = False):
    """(full, partial) run tables with one more run, tiles [lo, hi), for every query tile of batch row
    ``b`` (FULL, or PARTIAL with ``part``)."""
    full_partial = list(runs)
    r = full_partial[int(part)]
    start = torch.nn.functional.pad(r.start, (0, 1))
    end = torch.nn.functional.pad(r.end, (0, 1))
    num = r.num.clone()
    slot = num[b].long()[..., None]
    start[b].scatter_(-1, slot, torch.full_like(slot, lo, dtype=start.dtype))
    end[b].scatter_(-1, slot, torch.full_like(slot, hi, dtype=end.dtype))
    num[b] += 1
    full_partial[int(part)] = Runs(num=num, start=start.contiguous(), end=end.contiguous())
    return tuple(full_partial)


@pytest.mark.parametrize("part", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR, None], ids=["tma", "ptr", "default"])
def test_forged_runs_past_the_row_read_nothing(compiled, cfg, part, monkeypatch):
    """A plan forged past check_plan whose query tiles of batch row 0 list key tiles [Tk, 2 Tk), and
    whose key tiles list query tiles [Tq, 2 Tq): past the row. A check reads labels of row b at tile t
    and a kernel rows of (b, head) at tile t, so there the labels are row 1's (all sys: readable by
    every domain) and the rows are row 0's next head, or row 1's first head. Such runs are never
    trusted and the masked passes keep to the row's tiles: row 0's protected outputs and dq do not
    move when row 0's secret K/V are poisoned, nothing of row 0 (output, dq, dk, dv) moves when row
    1's Q/K/V are, and the outputs equal the honest plan's."""
    if cfg is None and not CUDA:
        pytest.skip("the default config runs on a GPU")
    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    n, hd = 48, 64
    ids = torch.stack([_ids(1, n, seed=17)[0], torch.zeros(n, dtype=torch.long)])  # row 1: sys only
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    secret = (ids[0] == SECRET).to(DEV)
    assert secret.any() and (~secret).any()
    dtype = torch.float32 if cfg is not None else torch.bfloat16
    q, k, v = _qkv(2, 2, 2, n, hd, dtype, seed=5)
    guard = GuardedAttention(compiled, cfg)
    plan = guard.plan(layout, 0, heads=2, dtype=dtype, head_dim=hd)
    tk, tq = plan.ks.size // plan.config.block_n, plan.qs.size // plan.config.block_m
    forged = dataclasses.replace(plan, runs=_with_run_past_the_row(plan.runs, 0, tk, 2 * tk, part),
                                 runs_t=_with_run_past_the_row(plan.runs_t, 0, tq, 2 * tq, part))
    do = torch.randn_like(q)

    def run(q_, k_, v_, p):
        q_, k_, v_ = (x.detach().clone().requires_grad_(True) for x in (q_, k_, v_))
        out = guard(q_, k_, v_, layout, 0, plan=p)
        return (out.detach(), *torch.autograd.grad(out, (q_, k_, v_), do))

    k0, v0 = k.detach().clone(), v.detach().clone()
    k0[0][:, secret], v0[0][:, secret] = float("nan"), float("inf")
    q1, k1, v1 = q.detach().clone(), k.detach().clone(), v.detach().clone()
    q1[1], k1[1], v1[1] = float("nan"), float("nan"), float("inf")
    clean = run(q, k, v, forged)
    keep = ~secret
    for got, want, what in zip(run(q, k0, v0, forged)[:2], clean, ("output", "dq")):
        assert torch.isfinite(got[0][:, keep]).all(), what
        assert torch.equal(got[0][:, keep], want[0][:, keep]), what
    for got, want, what in zip(run(q1, k1, v1, forged), clean, ("output", "dq", "dk", "dv")):
        assert torch.isfinite(got[0]).all(), what
        assert torch.equal(got[0], want[0]), what
    for got, want in zip(clean[:2], run(q, k, v, None)[:2]):
        assert _rel_err(got[0][:, keep], want[0][:, keep]) < (1e-5 if cfg is not None else 1e-2)


@pytest.mark.parametrize("check_full", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("forgery", ["all_partial", "honest_full_plus_partial"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR], ids=["tma", "ptr"])
def test_forged_partial_tiles_stay_exact_inside_the_kernel(compiled, cfg, forgery, check_full, monkeypatch):
    """Even a plan that got past check_plan and lists forbidden key tiles PARTIAL cannot make a
    forbidden NaN reach a protected row: the kernel reads the key domain of every listed tile and,
    finding one the query tile may not read (or when the tables are not checked at all), runs
    every tile masked with unreadable V rows replaced by zeros before the product, and unreadable
    keys' scores replaced by -inf (defence in depth behind DG319)."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(
        compiled, dataclasses.replace(cfg, check_full=check_full), 64, seed=31, qkv_seed=8, heads=2)
    forged = dataclasses.replace(plan, runs=_forged_runs(plan, forgery))
    a, b, honest = _poisoned_forwards(guard, layout, forged, q, k, v, secret)
    assert torch.isfinite(b[:, :, ~secret]).all()
    assert torch.equal(a[:, :, ~secret], b[:, :, ~secret])
    if forgery == "all_partial":
        assert _rel_err(a[:, :, ~secret], honest[:, :, ~secret]) < 1e-5  # the forged tables change no allowed pair


@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR, "hopper"], ids=["tma", "ptr", "hopper"])
def test_forged_mixed_partial_key_tile_is_read_masked(compiled, cfg, monkeypatch):
    """Honest labels, forged key order: a `secret` key swapped into a `sys` key tile (`_mixed`, past
    check_plan), and run tables listing every allowed tile PARTIAL, so readers of sys meet the mixed
    tile on the PARTIAL path, whose first slot (the one the FULL check reads) is sys. PARTIAL tiles
    that pass the kernel's check are masked by key index alone (keys of a readable domain or padding)
    with V and K not selected; the kernel reads every slot of every listed PARTIAL tile, finds the
    secret key and runs the query tile masked with unreadable V (forward) and K (dq) rows replaced.
    Poisoning every secret K and V moves no output or dq of a row that may not read secret (a kernel
    masking the secret key's score only turns those rows NaN: 0 * NaN in P @ V)."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    cfg, dtype = _hopper_or(cfg)
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(compiled, cfg, 96, seed=43, qkv_seed=4, dtype=dtype)
    ks = _mixed(plan.ks, secret[None], cfg.block_n)
    tk = plan.ks.size // cfg.block_n
    kinds = runs_kinds(*plan.runs, tk)
    forged_kinds = torch.where(kinds == FULL, torch.full_like(kinds, PARTIAL), kinds)
    forged = dataclasses.replace(plan, ks=ks, runs=(tile_runs(forged_kinds, FULL), tile_runs(forged_kinds, PARTIAL)))
    mixed_tile = int(((ks.dom[0].view(tk, -1) == SECRET) & (ks.dom[0].view(tk, -1)[:, :1] == 0)).any(1).nonzero()[0])
    readers = plan.qs.dom[0, ::cfg.block_m]
    listed = forged_kinds[0, 0, :, mixed_tile] == PARTIAL
    assert bool((listed & (readers != SECRET) & (readers != 0)).any())  # non-readers of secret list it PARTIAL
    do = torch.randn_like(q)
    pk, pv = k.detach().clone(), v.detach().clone()
    pk[:, :, secret] = float("inf")
    pv[:, :, secret] = float("nan")
    clean = _grads(guard, layout, forged, q, k, v, do)
    dirty = _grads(guard, layout, forged, q, pk, pv, do)
    for name, a, b in zip(("out", "dq"), clean[:2], dirty[:2]):
        assert torch.isfinite(b[:, :, ~secret]).all(), name
        assert torch.equal(a[:, :, ~secret], b[:, :, ~secret]), name


def _forgery_case(compiled, cfg, n: int, seed: int, qkv_seed: int, heads: int = 1, dtype=torch.float32, head_dim=64):
    """One row of ``n`` tokens in short random segments, q/k/v in ``dtype`` (one kv head), a guard
    with ``cfg`` and its honest plan: (ids, layout, secret mask [n], (q, k, v), guard, plan)."""
    ids = _ids(1, n, seed=seed)
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    secret = (ids[0] == SECRET).to(DEV)
    q, k, v = _qkv(1, heads, 1, n, head_dim, dtype, seed=qkv_seed)
    guard = GuardedAttention(compiled, cfg)
    plan = guard.plan(layout, 0, heads=heads, dtype=q.dtype, head_dim=head_dim)
    return ids, layout, secret, (q, k, v), guard, plan


def _poisoned_forwards(guard, layout, forged, q, k, v, secret):
    """Outputs through ``forged`` with the given K/V and with every secret K NaN and V +Inf, and the
    output through the honest plan: (clean, poisoned, honest)."""
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, secret] = float("nan")
    v2[:, :, secret] = float("inf")
    with torch.no_grad():
        return (guard(q, k, v, layout, 0, plan=forged), guard(q, k2, v2, layout, 0, plan=forged),
                guard(q, k, v, layout, 0))


def _hopper_or(cfg):
    """(config, dtype) of a forgery test: ``cfg`` in float32, or for ``"hopper"`` the Gluon forward and
    dq (128-query tiles, bf16) on an sm_90 GPU (skipped elsewhere)."""
    if cfg != "hopper":
        return cfg, torch.float32
    if not (CUDA and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the Gluon kernels run on an sm_90 GPU")
    return KernelConfig(dq=(("SUB_M", 128), ("SUB_N", 64), ("num_warps", 8), ("num_stages", 3))), torch.bfloat16


@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR, "hopper"], ids=["tma", "ptr", "hopper"])
def test_forged_mixed_query_tile_reads_nothing_foreign(compiled, cfg, monkeypatch):
    """Honest labels, forged query order: a `sys` token swapped into a `secret` query tile (past
    check_plan, which refuses it with DG319). The kernel sees the tile is not domain-pure, runs it
    masked, and gives the foreign row nothing — it never reads the secret keys the tile's FULL
    runs list, so neither its output nor its dq moves when every secret K/V is poisoned."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    cfg, dtype = _hopper_or(cfg)
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(compiled, cfg, 96, seed=43, qkv_seed=4, dtype=dtype)
    qs, bm = plan.qs, cfg.block_m
    tok, dom = qs.tok[0], qs.dom[0]
    s_tiles = [t for t in range(0, qs.size, bm) if int(dom[t]) == SECRET and int(tok[t + 1]) >= 0]
    sys_slot = int(((tok >= 0) & (dom == 0)).nonzero()[-1])  # the latest sys token: it sees the most keys
    moved = int(tok[sys_slot])
    forged = dataclasses.replace(plan, qs=_swapped(qs, sys_slot, s_tiles[-1] + 1))
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, secret] = 1e4
    v2[:, :, secret] = float("nan")
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, plan=forged)
    assert e.value.code == "DG319" and "not domain-pure" in str(e.value)
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    do = torch.randn_like(q)

    def run(k_, v_, plan_):
        qq = q.detach().clone().requires_grad_(True)
        out = guard(qq, k_.detach(), v_.detach(), layout, 0, plan=plan_)
        out.backward(do)
        return out.detach(), qq.grad

    (a, dq_a), (b, dq_b), (honest, dq_h) = run(k, v, forged), run(k2, v2, forged), run(k, v, plan)
    keep = ~secret
    keep[moved] = False
    assert torch.equal(a[:, :, ~secret], b[:, :, ~secret])  # no non-secret row moves under poisoning
    assert torch.equal(dq_a[:, :, ~secret], dq_b[:, :, ~secret])  # nor its gradient
    assert torch.equal(a[:, :, moved], torch.zeros_like(a[:, :, moved]))  # the foreign row reads nothing
    assert torch.equal(dq_a[:, :, moved], torch.zeros_like(dq_a[:, :, moved]))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (bf16: the masked path rounds in another order)
    assert _rel_err(a[:, :, keep], honest[:, :, keep]) < tol  # the other rows are as honest
    assert _rel_err(dq_a[:, :, keep], dq_h[:, :, keep]) < tol * 10


def _grads(guard, layout, plan, q, k, v, do):
    """(out, dq, dk, dv) of one call through ``plan`` (check_plan as the caller has it)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = guard(q, k, v, layout, 0, plan=plan)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


ANSWER = 4


@pytest.mark.parametrize("cfg", [SMALL, SMALL_PTR], ids=["tma", "ptr"])
def test_forged_mixed_query_tile_leaves_key_gradients_alone(compiled, cfg, monkeypatch):
    """Honest labels, forged query order: a `secret` token swapped into an `answer` query tile
    (past check_plan, which refuses it with DG319). The key-major tables list that tile, FULL or
    PARTIAL, for keys secret may not read (user, tool, answer). The dk/dv kernel reads the row
    domains of every query tile its tables list, finds this one impure and runs it masked with the
    foreign row's Q and dO replaced by zeros: poisoning every secret Q/K/V and dO moves no gradient
    of a key secret does not read (kernels trusting query-tile purity turned them NaN)."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(compiled, cfg, 96, seed=43, qkv_seed=4)
    do = torch.randn_like(q)
    qs, bm = plan.qs, cfg.block_m
    tok, dom = qs.tok[0], qs.dom[0]
    a_tiles = [t for t in range(0, qs.size, bm)
               if int(dom[t]) == ANSWER and int(tok[t + 1]) >= 0 and int(dom[t + 1]) == ANSWER]
    s_slot = int(((tok >= 0) & (dom == SECRET)).nonzero()[0])
    forged = dataclasses.replace(plan, qs=_swapped(qs, s_slot, a_tiles[-1] + 1))
    # Both of the kernel's paths meet the forged tile: FULL for some key tile, PARTIAL for another.
    by_key = runs_kinds(*plan.runs_t, qs.size // bm)[0, 0, :, a_tiles[-1] // bm]
    k_dom = plan.ks.dom[0, ::cfg.block_n]
    assert {FULL, PARTIAL} <= {int(x) for x in by_key[(k_dom != 0) & (k_dom != SECRET)]}
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, plan=forged)
    assert e.value.code == "DG319" and "not domain-pure" in str(e.value)

    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    pq, pk, pv, pdo = (t.detach().clone() for t in (q, k, v, do))
    pq[:, :, secret] = float("nan")
    pk[:, :, secret] = float("inf")
    pv[:, :, secret] = 1e30
    pdo[:, :, secret] = float("-inf")
    clean = _grads(guard, layout, forged, q, k, v, do)
    dirty = _grads(guard, layout, forged, pq, pk, pv, pdo)
    not_read_by_secret = ~(secret | (ids[0] == 0).to(DEV))
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        keep = not_read_by_secret if name in ("dk", "dv") else ~secret
        assert torch.isfinite(b[:, :, keep]).all(), name
        assert torch.equal(a[:, :, keep], b[:, :, keep]), name


@pytest.mark.parametrize("cfg", [SMALL, SMALL_KT], ids=["kt16", "kt32"])
@pytest.mark.parametrize("check_full", [True, False], ids=["checked", "unchecked"])
def test_forged_mixed_key_block_takes_nothing_from_non_readers(compiled, cfg, check_full, monkeypatch):
    """Honest labels, forged key order: a `secret` key swapped into a `sys` key tile (`_mixed`,
    past check_plan). The key-major tables list that tile FULL for later query tiles of domains
    that read sys but not secret; the dk/dv kernel sees its key block is not all of one domain
    (with or without the table check) and runs it masked, so the secret key's gradients take
    nothing from queries that may not read it: poisoning the Q and dO of every other domain
    leaves every secret key's dk/dv bitwise unchanged. With ``kt32`` a dk/dv program owns two key
    tiles, and the forged one is its first."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
    cfg = dataclasses.replace(cfg, check_full=check_full)
    # 160 tokens, and a layout whose later user/answer query tiles list the first sys key block FULL
    # at that block size (asserted below).
    seed = {16: 17, 32: 18}[cfg.block_kt]
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(compiled, cfg, 160, seed=seed, qkv_seed=6, heads=2)
    do = torch.randn_like(q)
    forged = dataclasses.replace(plan, ks=_mixed(plan.ks, secret[None], cfg.block_kt))
    sys_tile = int((plan.ks.dom[0, ::cfg.block_kt] == 0).nonzero()[0])  # the key block _mixed writes into
    q_dom = plan.qs.dom[0, ::cfg.block_m]
    readers = runs_kinds(*plan.runs_t, plan.qs.size // cfg.block_m)[0, 0, sys_tile]
    assert bool(((readers == FULL) & (q_dom != 0) & (q_dom != SECRET)).any())
    pq, pdo = q.detach().clone(), do.clone()
    pq[:, :, ~secret] = float("nan")
    pdo[:, :, ~secret] = float("inf")
    clean = _grads(guard, layout, forged, q, k, v, do)
    dirty = _grads(guard, layout, forged, pq, k, v, pdo)
    for name, a, b in zip(("dk", "dv"), clean[2:], dirty[2:]):
        assert torch.isfinite(b[:, :, secret]).all(), name
        assert torch.equal(a[:, :, secret], b[:, :, secret]), name


@pytest.mark.parametrize("field", ["order", "order_t", "order_t_repeat", "run_end", "q_inv", "dtype"])
def test_plan_tables_out_of_bounds_are_refused(compiled, field):
    import dataclasses

    n = 40
    layout = dg.Layout.from_ids(compiled, _ids(1, n, seed=5)).to(DEV)
    q, k, v = _qkv(1, 1, 1, n, 64, torch.float32, seed=5)
    guard = GuardedAttention(compiled, SMALL)
    plan = guard.plan(layout, 0, heads=1, dtype=q.dtype, head_dim=64)
    full, part = plan.runs
    if field == "order":
        forged = dataclasses.replace(plan, order=plan.order + 1)
    elif field == "order_t":
        forged = dataclasses.replace(plan, order_t=plan.order_t[:, :-1].contiguous())
    elif field == "order_t_repeat":  # a key tile twice, another never: its dk/dv would stay unwritten
        forged = dataclasses.replace(plan, order_t=torch.zeros_like(plan.order_t))
    elif field == "run_end":
        forged = dataclasses.replace(plan, runs=(full, Runs(part.num, part.start, part.end + 1000)))
    elif field == "q_inv":
        forged = dataclasses.replace(plan, q_inv=plan.q_inv.flip(1).contiguous())
    else:
        forged = dataclasses.replace(plan, order=plan.order.long())
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, plan=forged)
    assert e.value.code == "DG319"
    with torch.no_grad():  # the honest plan still runs, and is checked once
        guard(q, k, v, layout, 0, plan=plan)
        assert plan in guard._checked


@pytest.mark.parametrize("forgery", ["key_major_per_tile", "keys_padded_to_16"])
def test_key_major_tables_must_match_the_dk_dv_block(compiled, forgery, monkeypatch):
    """With dk/dv programs of 32 keys, a plan whose key-major tables are per 16-key tile, or whose
    key slots are padded only to 16 (a 32-key block may then hold two domains), is refused (DG319);
    the per-tile tables, run unchecked, give wrong key gradients, so the check is what stops them."""
    import dataclasses

    att = importlib.import_module("domainguard.attention")
    ids, layout, secret, (q, k, v), guard, plan = _forgery_case(compiled, SMALL_KT, 96, seed=5, qkv_seed=5)
    if forgery == "key_major_per_tile":
        kinds_t = runs_kinds(*plan.runs, plan.ks.size // SMALL_KT.block_n).transpose(-1, -2).contiguous()
        forged = dataclasses.replace(plan, runs_t=(tile_runs(kinds_t, FULL), tile_runs(kinds_t, PARTIAL)))
    else:
        small = GuardedAttention(compiled, SMALL).plan(layout, 0, heads=1, dtype=q.dtype, head_dim=64)
        assert small.ks.size % SMALL_KT.block_kt or bool(
            (small.ks.dom[0].view(-1, 32) != small.ks.dom[0].view(-1, 32)[:, :1]).any())
        forged = dataclasses.replace(small, config=SMALL_KT)
    with torch.no_grad(), pytest.raises(KernelError) as e:
        guard(q, k, v, layout, 0, plan=forged)
    assert e.value.code == "DG319"
    if forgery == "key_major_per_tile":
        monkeypatch.setattr(att, "check_plan", lambda *a, **kw: None)
        do = torch.randn_like(q)
        honest, wrong = _grads(guard, layout, plan, q, k, v, do), _grads(guard, layout, forged, q, k, v, do)
        assert not torch.equal(honest[2], wrong[2])


def test_digest_covers_tables_and_sources(compiled):
    from domainguard.kernels import source_digest, source_manifest

    other = dg.compile(dg.loads_policy(LONELY), layers=2)
    assert GuardedAttention(compiled).digest() != GuardedAttention(other).digest()
    assert GuardedAttention(compiled).digest() == GuardedAttention(compiled).digest()
    assert len(source_digest()) == 64 and "forward.py" in source_manifest()


def test_refusals_are_clear(compiled):
    layout = dg.Layout.from_ids(compiled, _ids(1, 8, seed=1)).to(DEV)
    q, k, v = _qkv(1, 1, 1, 8, 96, torch.float32, seed=1)
    with pytest.raises(KernelError) as e:
        attention(q, k, v, layout, compiled, backend="triton")
    assert e.value.code == "DG316"
    per_head = dg.compile(dg.loads_policy(POLICY.replace(
        "{default: {causal: true}}", '{default: {causal: true}, user: [{causal: true, window: 4, heads: "0-1"}, {causal: true}]}'
    )), layers=1)
    q, k, v = _qkv(1, 1, 1, 8, 64, torch.float32, seed=1)
    with pytest.raises(KernelError) as e:
        attention(q, k, v, dg.Layout.from_ids(per_head, _ids(1, 8, seed=1)).to(DEV), per_head, backend="triton")
    assert e.value.code == "DG315" and "differ between heads" in str(e.value)


# Pattern parts on the kernels: each must match the dense reference (relation AND pattern).
KERNEL_PATTERNS = {
    "window+global": "{default: {causal: true}, user: {causal: true, window: 6, global_tokens: 4}, answer: {causal: true, window: 9}}",
    "dilated+strided": "{default: {causal: true, window: 5, dilation: 3}, tool: {causal: true, stride: 4}, secret: {stride: 5}}",
    "block_local": "{default: {causal: true, block_local: 12}, sys: {causal: true}}",
    "random": "{default: {causal: true, window: 3, random: {links: 3, seed: 5}}, answer: {causal: true, random: {links: 6, seed: 1}}}",
}


@pytest.mark.parametrize("name", list(KERNEL_PATTERNS))
def test_patterns_on_the_kernels_match_reference(name):
    """Forward, backward and decode apply each pattern part exactly on PARTIAL tiles, skip the
    tiles it empties, and keep forbidden values out of protected rows."""
    pol = dg.compile(dg.loads_policy(POLICY.replace("{default: {causal: true}}", KERNEL_PATTERNS[name])), layers=1)
    n = 80 if not CUDA else 900
    ids = _ids(2, n, seed=41)
    ids[1, -6:] = pol.pad_id
    layout = dg.Layout.from_ids(pol, ids).to(DEV)
    guard = GuardedAttention(pol, SMALL if not CUDA else None)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    q, k, v = _qkv(2, 2, 1, n, 64, dtype, seed=2)
    out = guard(q, k, v, layout, 0)
    ref = attention_reference(q, k, v, layout, pol, 0)
    tol = TOL[dtype]
    assert _rel_err(out, ref) < tol
    do = torch.randn_like(out)
    for g, r, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do), "qkv"):
        assert _rel_err(g, r) < tol * 2, w
    # The pattern empties tiles the relation alone would visit.
    plain = GuardedAttention(compiled_plain := dg.compile(dg.loads_policy(POLICY), layers=1), SMALL if not CUDA else None)
    mine = guard.plan(layout, 0, heads=2, dtype=dtype, head_dim=64).stats()
    theirs = plain.plan(dg.Layout.from_ids(compiled_plain, ids).to(DEV), 0, heads=2, dtype=dtype, head_dim=64).stats()
    assert mine["full_tiles"] + mine["partial_tiles"] <= theirs["full_tiles"] + theirs["partial_tiles"]
    assert mine["full_tiles"] < theirs["full_tiles"]
    # Decode: the last tokens against the cache, pattern alignment by sequence index.
    new = 4
    with torch.no_grad():
        qd = q[:, :, -new:].detach().clone()
        got = guard(qd, k, v, layout, 0, q_slice=new)
        want = attention_reference(qd, k, v, layout, pol, 0, q_slice=new)
    assert _rel_err(got, want) < tol
    # Poison the secret domain (read by nobody): everything else is bitwise unchanged.
    secret = (ids == SECRET).to(DEV)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2.masked_fill_(secret[:, None, :, None], float("nan"))
    v2.masked_fill_(secret[:, None, :, None], float("inf"))
    with torch.no_grad():
        a = guard(q, k, v, layout, 0)
        b = guard(q, k2, v2, layout, 0)
        da = guard(qd, k, v, layout, 0, q_slice=new)
        db = guard(qd, k2, v2, layout, 0, q_slice=new)
    keep = ~secret[:, None, :, None].expand_as(a)
    assert torch.equal(a[keep], b[keep])
    keep_d = ~secret[:, None, -new:, None].expand_as(da)
    assert torch.equal(da[keep_d], db[keep_d])


@pytest.mark.parametrize("hq,hkv,hd", [(3, 1, 64), (4, 4, 128)] + ([(9, 3, 64), (32, 8, 128)] if CUDA else []))
def test_decode_matches_reference_with_causal_alignment(compiled, hq, hkv, hd):
    """A few new tokens against a KV cache (split-KV kernel), incl. GQA groups that are not powers of two."""
    n, new = (150, 3) if not CUDA else (3000, 5)
    ids = _ids(2, n, seed=21)
    ids[:, -new:] = 4  # generated tokens are `answer`
    ids[1, :9] = compiled.pad_id  # a left-padded row
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(2, hq, hkv, n, hd, torch.float16, seed=4, nq=new)
    guard = GuardedAttention(compiled)
    with torch.no_grad():
        out, lse = guard(q, k, v, layout, 1, q_slice=new, return_lse=True)
        ref, ref_lse = attention_reference(q, k, v, layout, compiled, 1, q_slice=new, return_lse=True)
    assert _rel_err(out, ref) < 5e-3
    assert torch.allclose(lse, ref_lse, atol=5e-2)
    # Poison the secret domain of the cache: the new tokens' outputs stay bitwise equal.
    secret = (ids == SECRET).to(DEV)
    k2, v2 = k.detach().clone(), v.detach().clone()
    for t in (k2, v2):
        t.masked_fill_(secret[:, None, :, None], float("nan"))
    with torch.no_grad():
        out2 = guard(q, k2, v2, layout, 1, q_slice=new)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("hq,hkv", [(2, 1), (6, 2)])
def test_decode_splits_merge_exactly(compiled, hq, hkv):
    """The split-KV decode kernel with 1..5 splits of the keys (the last split of a query tile to
    finish merges them): every split count matches the reference, and each is bitwise unmoved by
    NaN in the keys and values of the domain no new query may read."""
    from domainguard.kernels.decode import launch_decode
    from domainguard.kernels.tables import freeze

    n, new = 200, 4
    ids = _ids(1, n, seed=37)
    ids[0, -new:] = torch.tensor([4, 1, 4, 2])  # three query tiles' worth of domains
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, hq, hkv, n, 64, torch.float32, seed=8, nq=new)
    guard = GuardedAttention(compiled)
    plan = guard.decode_plan(layout, 1, new, heads=hq, kv_heads=hkv)
    tables = freeze(compiled, 1)
    secret = (ids == SECRET).to(DEV)
    k2, v2 = k.detach().clone(), v.detach().clone()
    for t in (k2, v2):
        t.masked_fill_(secret[:, None, :, None], float("nan"))
    labels = (layout.domain_ids, layout.index, layout.domain_rank)
    with torch.no_grad():
        ref, ref_lse = attention_reference(q, k, v, layout, compiled, 1, q_slice=new, return_lse=True)
        for splits in (1, 2, 3, 5):
            out, lse = launch_decode(q, k, v, plan.qs, *labels, tables, 0.125, block_n=16, splits=splits)
            assert _rel_err(out, ref) < 1e-4, splits
            assert torch.allclose(lse, ref_lse, atol=1e-4), splits
            out2, lse2 = launch_decode(q, k2, v2, plan.qs, *labels, tables, 0.125, block_n=16, splits=splits)
            assert torch.equal(out, out2) and torch.equal(lse, lse2), splits


@pytest.mark.parametrize("nq", [1, 3])
def test_a_layout_of_another_batch_is_refused(compiled, nq):
    """The kernels read one row of labels per batch row: a layout of batch 1 under q/k/v of batch 2
    is refused before any kernel runs (it would read labels past the layout's end)."""
    layout = dg.Layout.from_ids(compiled, _ids(1, 40, seed=3)).to(DEV)
    q, k, v = _qkv(2, 2, 1, 40, 64, torch.float32, seed=1, nq=nq)
    with torch.no_grad(), pytest.raises(KernelError) as e:
        GuardedAttention(compiled)(q, k, v, layout, 0, q_slice=nq)
    assert e.value.code == "DG311" and "1 batch rows but q/k/v have 2" in str(e.value)


@pytest.mark.skipif(not CUDA, reason="the merge's ordering only shows with programs running concurrently")
def test_decode_split_merge_is_repeatable_on_the_gpu(compiled):
    """Many splits merged by whichever finishes last: 300 repeats give bitwise the first result."""
    from domainguard.kernels.decode import launch_decode
    from domainguard.kernels.tables import freeze

    n, new = 20000, 2
    ids = _ids(2, n, seed=41)
    ids[:, -new:] = 4
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(2, 8, 2, n, 128, torch.bfloat16, seed=9, nq=new)
    plan = GuardedAttention(compiled).decode_plan(layout, 0, new, heads=8, kv_heads=2)
    args = (q.detach(), k.detach(), v.detach(), plan.qs, layout.domain_ids, layout.index, layout.domain_rank,
            freeze(compiled, 0), 0.088)
    first = launch_decode(*args, block_n=64, splits=48)
    for _ in range(300):
        out, lse = launch_decode(*args, block_n=64, splits=48)
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


@pytest.mark.skipif(not CUDA, reason="sizes where whole splits of the keys fall in one forbidden span")
@pytest.mark.parametrize("hq,hkv,hd,dtype", [(32, 8, 128, torch.bfloat16), (8, 1, 64, torch.float16)])
def test_decode_splits_that_read_nothing_stay_out_of_the_merge(compiled, hq, hkv, hd, dtype):
    """A 32K-token cache whose middle 12K are one secret segment: the splits over it have no readable key
    (running max -inf). Filled with NaN and Inf, they leave the new tokens' outputs bitwise unchanged, and
    every split count agrees with the reference."""
    from domainguard.kernels.decode import launch_decode
    from domainguard.kernels.tables import freeze

    n, new = 32768, 3
    ids = _ids(1, n, seed=51, d=3)  # sys, user, tool, read by `answer`
    ids[0, 10000:22000] = SECRET
    ids[0, -new:] = 4
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, hq, hkv, n, hd, dtype, seed=13, nq=new)
    q, k, v = q.detach(), k.detach(), v.detach()
    plan = GuardedAttention(compiled).decode_plan(layout, 0, new, heads=hq, kv_heads=hkv)
    labels = (plan.qs, layout.domain_ids, layout.index, layout.domain_rank, freeze(compiled, 0), hd ** -0.5)
    secret = (ids == SECRET).to(DEV)[:, None, :, None]
    k2, v2 = k.masked_fill(secret, float("nan")), v.masked_fill(secret, float("inf"))
    with torch.no_grad():
        ref = attention_reference(q, k, v, layout, compiled, 0, q_slice=new)
        for splits in (1, 7, 64):
            out, lse = launch_decode(q, k, v, *labels, block_n=64, splits=splits)
            assert _rel_err(out, ref) < 1e-2, splits
            out2, lse2 = launch_decode(q, k2, v2, *labels, block_n=64, splits=splits)
            assert torch.equal(out, out2) and torch.equal(lse, lse2), splits


def test_decode_mixed_query_domains(compiled):
    n, new = 90, 6
    ids = _ids(1, n, seed=23)
    ids[0, -new:] = torch.tensor([4, 1, 4, 2, 4, 3])
    layout = dg.Layout.from_ids(compiled, ids).to(DEV)
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=6, nq=new)
    with torch.no_grad():
        out = GuardedAttention(compiled)(q, k, v, layout, 0, q_slice=new)
        ref = attention_reference(q, k, v, layout, compiled, 0, q_slice=new)
    assert _rel_err(out, ref) < 1e-4
