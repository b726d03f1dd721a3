"""The pieces under the kernels, each against its reference: slot order, runs, masks, row moves."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import domainguard as dg
from domainguard.kernels.forward import _runs_impure, _runs_readable
from domainguard.kernels.masks import _key_readable, _pair_mask, _tile_mask, pair_mask_reference
from domainguard.kernels.permute import backward_inputs, backward_inputs_reference, gather_rows, gather_rows_reference
from domainguard.kernels.plan import EMPTY, FULL, PARTIAL, Runs, merge_key_tiles, runs_kinds, sort_slots, tile_runs
from domainguard.kernels.tables import freeze
from domainguard.layout import TokenAttrs
from domainguard.patterns import rules_for, token_mask

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

POLICY = """
domainguard: 1
name: parts
domains: {a: {}, b: {children: {b1: {}, b2: {}}}, c: {}}
reads: {b1: [a], b2: [b1], c: [a, b]}
patterns: {default: {causal: true}, c: {}}
"""


@pytest.fixture(scope="module")
def compiled():
    return dg.compile(dg.loads_policy(POLICY), layers=1)


def _layout(compiled, n=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, compiled.num_domains, (2, n), generator=g)
    ids[1, -5:] = compiled.pad_id
    return dg.Layout.from_ids(compiled, ids)


@pytest.mark.parametrize("query", [True, False])
def test_sort_slots_is_a_padded_permutation_with_pure_tiles(compiled, query):
    lay = _layout(compiled)
    a = lay.attrs()
    block = 8
    s = sort_slots(a.domain, a.index, a.rank, compiled.pad_id, block, query=query)
    assert s.size % block == 0
    for b in range(2):
        tok = s.tok[b]
        real = tok >= 0
        assert sorted(tok[real].tolist()) == list(range(lay.seq_len))  # every token exactly once
        assert torch.equal(s.dom[b][real].long(), a.domain[b][tok[real].long()])
        assert torch.equal(s.idx[b][real].long(), a.index[b][tok[real].long()])
        tiles = s.dom[b].view(-1, block)
        if query:  # padding copies its group's attributes: every tile holds one domain
            assert bool((tiles == tiles[:, :1]).all())
        else:  # key padding is the pad domain, index -1
            assert bool((s.dom[b][~real] == compiled.pad_id).all()) and bool((s.idx[b][~real] == -1).all())
            real_tiles = real.view(-1, block)
            first = torch.where(real_tiles, tiles, -1).amax(1, keepdim=True)
            assert bool(((tiles == first) | ~real_tiles).all())
        # sequence order is kept inside each domain group
        for d in range(compiled.num_domains + 1):
            sel = real & (s.dom[b] == d)
            assert torch.equal(tok[sel], tok[sel].sort().values)


def test_tile_runs_rebuild_the_kinds():
    g = torch.Generator().manual_seed(3)
    kinds = torch.randint(0, 3, (2, 1, 5, 13), generator=g).to(torch.uint8)
    for kind in (FULL, PARTIAL):
        runs = tile_runs(kinds, kind)
        rebuilt = torch.zeros_like(kinds, dtype=torch.bool)
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in kinds.shape[:3])).tolist():
            b, h, t = idx
            for r in range(int(runs.num[b, h, t])):
                rebuilt[b, h, t, runs.start[b, h, t, r] : runs.end[b, h, t, r]] = True
        assert torch.equal(rebuilt, kinds == kind)
        assert runs.tiles == int((kinds == kind).sum())
    assert torch.equal(runs_kinds(tile_runs(kinds, FULL), tile_runs(kinds, PARTIAL), kinds.shape[-1]), kinds)


@pytest.mark.parametrize("window", [None, 5])
def test_merged_key_tiles_are_the_block_map_of_wider_key_tiles(compiled, window):
    """Key-major tables of dk/dv programs owning 2 or 4 key tiles (``merge_key_tiles``) equal the
    block map built directly at that key-tile size, over the same slots."""
    from domainguard.attention import GuardedAttention, _slot_attrs

    if window:
        windowed = POLICY.replace("default: {causal: true}", f"default: {{causal: true, window: {window}}}")
        assert windowed != POLICY
        compiled = dg.compile(dg.loads_policy(windowed), layers=1)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, compiled.num_domains, (2, 150), generator=g)
    ids[1, -20:] = compiled.pad_id
    layout = dg.Layout.from_ids(compiled, ids)
    guard = GuardedAttention(compiled)
    qa, ka = layout.attrs(), layout.attrs()
    qs = sort_slots(qa.domain, qa.index, qa.rank, compiled.pad_id, 64, query=True)
    ks = sort_slots(ka.domain, ka.index, ka.rank, compiled.pad_id, 64, query=False)
    fine = guard._tile_kinds(0, _slot_attrs(qs), _slot_attrs(ks), 16, 16)
    seen = set()
    for r in (2, 4):
        wide = guard._tile_kinds(0, _slot_attrs(qs), _slot_attrs(ks), 16, 16 * r)
        assert torch.equal(merge_key_tiles(fine, r), wide)
        seen |= set(wide.unique().tolist())
    assert seen == {EMPTY, PARTIAL, FULL}  # every case of the merge occurs
    assert merge_key_tiles(fine, 1) is fine


def test_runs_kinds_marks_overlapping_runs():
    """Run tables that cover a tile twice (or as both kinds) cannot pass as a tile table."""
    kinds = torch.tensor([[[[2, 2, 1, 0, 1]]]], dtype=torch.uint8)
    full, part = tile_runs(kinds, FULL), tile_runs(kinds, PARTIAL)
    overlap = Runs(num=part.num, start=part.start.clone(), end=part.end)
    overlap.start[..., 0] = 1  # first PARTIAL run now starts on a FULL tile
    got = runs_kinds(full, overlap, 5)
    assert got[0, 0, 0].tolist() == [2, 255, 1, 0, 1]
    twice = Runs(num=full.num + 1, start=torch.cat([full.start, full.start], -1), end=torch.cat([full.end, full.end], -1))
    assert runs_kinds(twice, part, 5)[0, 0, 0].tolist() == [255, 255, 1, 0, 1]


@triton.jit
def _mask_probe(QD, QI, QR, KD, KI, KR, Out, OutTile, OutT, PDom, REL: tl.constexpr, CAUSAL: tl.constexpr, DP: tl.constexpr,
                PAT: tl.constexpr, HAS_PAT: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    qd, qi, qr = tl.load(QD + rm), tl.load(QI + rm), tl.load(QR + rm)
    kd, ki, kr = tl.load(KD + rn), tl.load(KI + rn), tl.load(KR + rn)
    p_dom = tl.load(PDom)  # a loaded scalar, as in the kernels (an int argument of 1 would be specialised)
    ok = _pair_mask(qd, qi, qr, kd, ki, kr, p_dom, REL, CAUSAL, DP, PAT, HAS_PAT)
    tl.store(Out + rm[:, None] * N + rn[None, :], ok.to(tl.int8))
    # What the forward and dq (``T`` False) and dk/dv (``T`` True) kernels apply inside a pure tile.
    readable = _key_readable(p_dom, kd, REL, DP)
    ok_tile = _tile_mask(readable, qd == p_dom, qi, qr, ki, kr, p_dom, CAUSAL, DP, PAT, HAS_PAT, False)
    tl.store(OutTile + rm[:, None] * N + rn[None, :], ok_tile.to(tl.int8))
    ok_t = _tile_mask(readable, qd == p_dom, qi, qr, ki, kr, p_dom, CAUSAL, DP, PAT, HAS_PAT, True)
    tl.store(OutT + rn[:, None] * M + rm[None, :], ok_t.to(tl.int8))


def _probe_each_query_domain(tables, q_att, k_att, truth):
    """``_mask_probe`` (``_pair_mask``, and ``_tile_mask`` in both orientations) == ``truth`` on the
    rows of each query domain: the kernels take the pattern of the (domain-pure) query tile, so
    one domain at a time; ``_tile_mask`` gives the other rows nothing."""
    m, n = q_att.domain.shape[0], k_att.domain.shape[0]
    qd, qi, qr = (t.int().to(DEV).contiguous() for t in q_att)
    kd, ki, kr = (t.int().to(DEV).contiguous() for t in k_att)
    for dom in q_att.domain.unique().tolist():
        rows = q_att.domain == dom
        out = torch.empty(m, n, dtype=torch.int8, device=DEV)
        out_tile = torch.empty(m, n, dtype=torch.int8, device=DEV)
        out_t = torch.empty(n, m, dtype=torch.int8, device=DEV)
        p_dom = torch.tensor([dom], dtype=torch.int32, device=DEV)
        _mask_probe[(1,)](qd, qi, qr, kd, ki, kr, out, out_tile, out_t, p_dom, REL=tables.rel_bits, CAUSAL=tables.causal_bits,
                          DP=tables.dp, PAT=tables.pattern_constants, HAS_PAT=tables.has_pattern, M=m, N=n)
        assert torch.equal(out.bool().cpu()[rows], truth[rows]), dom
        assert torch.equal(out_tile.bool().cpu()[rows], truth[rows]), dom
        assert torch.equal(out_t.bool().cpu().T, out_tile.bool().cpu()), dom
        assert not out_tile.bool().cpu()[~rows].any(), dom


# Every pattern part the kernels apply, alone and combined; per domain, so one probe mixes them.
PATTERNS = {
    "causal": "{default: {causal: true}, c: {}}",
    "window": "{default: {causal: true, window: 5}, c: {window: 3}}",
    "dilated": "{default: {causal: true, window: 3, dilation: 4}, b2: {window: 20, dilation: 3}, c: {}}",
    "strided": "{default: {causal: true, stride: 7}, c: {stride: 3}}",
    "block_local": "{default: {causal: true, block_local: 16}, c: {block_local: 5}}",
    "global": "{default: {causal: true, window: 2, global_tokens: 3}, c: {global_tokens: 2}}",
    "random": "{default: {causal: true, window: 2, random: {links: 3, seed: 11}}, c: {random: {links: 5, seed: 4}}}",
    "mixed": "{default: {causal: true}, a: {causal: true, stride: 5, block_local: 8}, b1: {window: 4, global_tokens: 2}, "
             "c: {causal: true, window: 6, dilation: 2, random: {links: 2, seed: 9}}}",
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_kernel_mask_equals_the_layout_helpers_ground_truth(name):
    """The element mask the kernels apply (forward and transposed backward form) and its PyTorch
    twin == patterns.token_mask (relation AND pattern), pads included, for every pattern part."""
    compiled = dg.compile(dg.loads_policy(POLICY.replace("{default: {causal: true}, c: {}}", PATTERNS[name])), layers=1)
    tables = freeze(compiled, 0)
    assert tables.has_pattern == (name != "causal")
    m = 64
    lay = _layout(compiled, n=m, seed=5)
    a = lay.attrs()
    truth = token_mask(TokenAttrs(a.domain[1], a.index[1], a.rank[1]), TokenAttrs(a.domain[1], a.index[1], a.rank[1]),
                       compiled.relation(0), rules_for(compiled, 0))
    att = TokenAttrs(a.domain[1], a.index[1], a.rank[1])
    _probe_each_query_domain(tables, att, att, truth)
    ref = pair_mask_reference(a.domain[1], a.index[1], a.domain[1], a.index[1], tables, a.rank[1], a.rank[1])
    assert torch.equal(ref, truth)
    if name != "causal":  # the pattern removes pairs the relation and causality keep
        plain = dg.compile(dg.loads_policy(POLICY), layers=1)
        assert bool((token_mask(TokenAttrs(a.domain[1], a.index[1], a.rank[1]), TokenAttrs(a.domain[1], a.index[1], a.rank[1]),
                                plain.relation(0), rules_for(plain, 0)) & ~truth).any())


@pytest.mark.parametrize("name", ["dilated", "strided", "block_local", "global", "random", "mixed"])
def test_kernel_mask_at_large_positions_and_decode_shapes(name):
    """The same comparison with positions near 128K and queries that are only the last rows of
    the keys (a decode step), so window edges, residues, block numbers, hub ranks and link
    hashes are exercised far from 0 and with query and key sets that differ."""
    compiled = dg.compile(dg.loads_policy(POLICY.replace("{default: {causal: true}, c: {}}", PATTERNS[name])), layers=1)
    tables = freeze(compiled, 0)
    n, m, shift = 128, 32, 131072 - 128 - 3
    lay = _layout(compiled, n=n, seed=7)
    a = lay.attrs()
    real = a.index[0] >= 0
    k_att = TokenAttrs(a.domain[0], torch.where(real, a.index[0] + shift, a.index[0]),
                       torch.where(a.rank[0] >= 0, a.rank[0] + shift // 2, a.rank[0]))
    q_att = TokenAttrs(k_att.domain[-m:], k_att.index[-m:], k_att.rank[-m:])
    truth = token_mask(q_att, k_att, compiled.relation(0), rules_for(compiled, 0))
    assert truth.any() and not truth.all()
    _probe_each_query_domain(tables, q_att, k_att, truth)
    assert torch.equal(pair_mask_reference(*q_att[:2], *k_att[:2], tables, q_att.rank, k_att.rank), truth)


def test_pattern_constants_at_their_edges():
    """An unbounded window of dilation 1 keeps every pair (so the union does: no pattern), a union
    that keeps nothing cannot be encoded, and values past 32 bits are refused (DG320)."""
    from domainguard.errors import KernelError
    from domainguard.kernels.tables import PATTERN_FIELDS, pattern_fields
    from domainguard.patterns import GlobalTokens, MaskRule, Strided, Window

    assert pattern_fields(MaskRule(union=(Window(None, 1), Strided(3)))) == (0,) * PATTERN_FIELDS
    assert pattern_fields(MaskRule(union=(Window(None, 4),)))[:2] == (0, 4)
    with pytest.raises(KernelError) as e:
        pattern_fields(MaskRule(union=(GlobalTokens(0),)))
    assert e.value.code == "DG315"
    with pytest.raises(KernelError) as e:
        pattern_fields(MaskRule(union=(Window(70000, 65537),)))
    assert e.value.code == "DG320" and str(70000 * 65537) in str(e.value)
    big = dg.compile(dg.loads_policy(POLICY.replace("{default: {causal: true}, c: {}}",
                                                    "{default: {causal: true}, c: {window: 2147483648}}")), layers=1)
    with pytest.raises(KernelError) as e:
        freeze(big, 0)
    assert e.value.code == "DG320"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_moves_are_bitwise_copies(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 20, 64, generator=g).to(DEV, dtype)
    x[0, 1, 4] = float("nan")
    x[1, 2, 7] = float("-inf")
    src = torch.tensor([[3, 4, -1, 0, 19, -1, 7, 7], [7, -1, 2, 1, 0, 5, 6, 4]], dtype=torch.int32, device=DEV)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    got, want = gather_rows(x, src), gather_rows_reference(x, src)
    assert torch.equal(got.view(bits), want.view(bits))
    # Two tensors in one launch (K and V): the second with other strides ([B, N, H, D] storage).
    x2 = torch.randn(2, 20, 3, 64, generator=g).to(DEV, dtype).transpose(1, 2)
    x2[1, 0, 3] = float("inf")
    pair = gather_rows(x, src, x2)
    for a, b in zip(pair, (want, gather_rows_reference(x2, src))):
        assert a.is_contiguous() and torch.equal(a.view(bits), b.view(bits))
    with pytest.raises(ValueError, match="must match"):
        gather_rows(x, src, x2[:, :, :10])
    do, o = torch.randn_like(x), torch.randn_like(x)
    for a, b in zip(backward_inputs(x, do, o, src), backward_inputs_reference(x, do, o, src)):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("use_tma", [False, True], ids=["gather-in-kernel", "tma"])
def test_forward_kernel_against_its_slot_order_twin(compiled, use_tma):
    """launch_forward (slot order, runs) vs forward_reference (same inputs, dense mask)."""
    from domainguard.attention import GuardedAttention, KernelConfig
    from domainguard.kernels.forward import forward_reference, launch_forward

    cfg = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, use_tma=use_tma)
    guard = GuardedAttention(compiled, cfg)
    lay = _layout(compiled, n=40, seed=9).to(DEV)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 40, 64, generator=g).to(DEV) for _ in range(3))
    plan = guard.plan(lay, 0, heads=2, dtype=q.dtype, head_dim=64)
    tables = guard.tables(0)
    out, lse2 = launch_forward(q, k, v, plan.qs, plan.ks, plan.runs, plan.order, tables, 0.125,
                               block_m=16, block_n=16, num_warps=4, num_stages=1, use_tma=use_tma)
    ref, ref_lse2 = forward_reference(q, k, v, plan.qs, plan.ks, tables, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    real = plan.qs.tok >= 0
    torch.testing.assert_close(lse2[:, :, :][real[:, None].expand_as(lse2)], ref_lse2[real[:, None].expand_as(lse2)],
                               rtol=1e-4, atol=1e-4)


@triton.jit
def _runs_check_probe(Start, End, N, KDom, KIdx, Dom, Out, REL: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
                      CHUNK: tl.constexpr):
    n = tl.load(N)
    tl.store(Out, _runs_readable(Start, End, n, KDom, 0, tl.load(Dom), REL, DP, BLOCK_N, CHUNK))
    tl.store(Out + 1, _runs_impure(Start, End, n, KDom, KIdx, 0, BLOCK_N, CHUNK))


@pytest.mark.parametrize("chunk", [1, 2, 4, 64])
def test_run_table_check_counts_every_fault(compiled, chunk):
    """``forward._runs_readable`` and ``forward._runs_impure`` (what the forward and dq kernels
    check before trusting their run tables) against counts in Python, on random tables of up to 9
    runs of up to 7 tiles: every listed tile whose first slot's domain the reader may not read, and
    every slot of a listed tile that is neither of that domain nor padding (index < 0); tiles not
    listed never count. Chunks of 1, 2 and 4 tiles make the inner loops go round several times."""
    tables = freeze(compiled, 0)
    g = torch.Generator().manual_seed(chunk)
    bn, tiles = 4, 40
    rel = compiled.relation(0)
    faults = 0
    for trial in range(12):
        kd = torch.randint(0, tables.dp, (tiles, 1), generator=g).repeat(1, bn)
        ki = torch.randint(0, 50, (tiles, bn), generator=g)
        odd = torch.rand(tiles, bn, generator=g) < 0.04  # stray slots of another domain, or padding
        kd = torch.where(odd, torch.randint(0, tables.dp, (tiles, bn), generator=g), kd)
        ki = torch.where(odd & (torch.rand(tiles, bn, generator=g) < 0.5), torch.full_like(ki, -1), ki)
        cuts = sorted(torch.randperm(tiles, generator=g)[: 2 * int(torch.randint(0, 10, (1,), generator=g))].tolist())
        starts, ends = cuts[0::2], cuts[1::2]
        reader = int(torch.randint(0, compiled.num_domains, (1,), generator=g))
        unreadable = impure = 0
        for s, e in zip(starts, ends):
            for t in range(s, e):
                first = int(kd[t, 0])
                unreadable += int(first >= compiled.num_domains or not bool(rel[reader, first]))
                impure += int(((kd[t] != first) & (ki[t] >= 0)).sum())
        out = torch.zeros(2, dtype=torch.int32, device=DEV)
        args = [torch.tensor(x, dtype=torch.int32, device=DEV) for x in (starts + [0], ends + [0], [len(starts)])]
        _runs_check_probe[(1,)](*args, kd.int().flatten().to(DEV), ki.int().flatten().to(DEV),
                                torch.tensor([reader], dtype=torch.int32, device=DEV), out, REL=tables.rel_bits,
                                DP=tables.dp, BLOCK_N=bn, CHUNK=chunk)
        assert out.tolist() == [unreadable, impure], (trial, starts, ends)
        faults += unreadable * impure  # trials with both kinds of fault
    assert faults > 0


def _listed(runs, b, h, t):
    """Tile indices the run table row (b, h, t) lists."""
    n = int(runs.num[b, h, t])
    return [x for r in range(n) for x in range(int(runs.start[b, h, t, r]), int(runs.end[b, h, t, r]))]


def _query_trust_expected(qs, ks, runs, tables, bm, bn, check_full):
    """Python twin of ``forward._trust_kernel``: [B, Hm, Tq, 2]."""
    full, part = runs
    qd, kd, ki = qs.dom.cpu(), ks.dom.cpu(), ks.idx.cpu()

    def readable(reader, src):
        return 0 <= src < tables.dp and tables.allowed(reader, src)

    out = torch.zeros(*full.num.shape, 2, dtype=torch.int32)
    for b, h, t in torch.cartesian_prod(*(torch.arange(s) for s in full.num.shape)).tolist():
        rows = qd[b, t * bm:(t + 1) * bm]
        dom = int(rows[0])
        ok = bool((rows == dom).all())
        ok &= int(full.num[b, h, t]) <= full.start.shape[-1] and int(part.num[b, h, t]) <= part.start.shape[-1]
        if check_full and ok:
            for kt in _listed(full, b, h, t) + _listed(part, b, h, t):
                ok &= readable(dom, int(kd[b, kt * bn]))
            for kt in _listed(part, b, h, t):
                s = slice(kt * bn, (kt + 1) * bn)
                ok &= not bool(((kd[b, s] != kd[b, kt * bn]) & (ki[b, s] >= 0)).any())
        out[b, h, t, 0] = int(full.num[b, h, t]) if ok else 0
        out[b, h, t, 1] = int(part.num[b, h, t]) if ok and check_full else 0
    return out


def _key_trust_expected(qs, ks, runs_t, tables, bm, bkt, check_full):
    """Python twin of ``backward._key_trust_kernel``: [B, Hm, Tk, 2]."""
    full, part = runs_t
    qd, kd = qs.dom.cpu(), ks.dom.cpu()
    out = torch.zeros(*full.num.shape, 2, dtype=torch.int32)
    for b, h, u in torch.cartesian_prod(*(torch.arange(s) for s in full.num.shape)).tolist():
        if not check_full:
            out[b, h, u] = torch.tensor([1, 0])
            continue
        k_dom = int(kd[b, u * bkt])

        def pure(t):
            rows = qd[b, t * bm:(t + 1) * bm]
            return bool((rows == rows[0]).all())

        def reads(t):
            d = int(qd[b, t * bm])
            return 0 <= d < tables.dp and 0 <= k_dom < tables.dp and tables.allowed(d, k_dom)

        out[b, h, u, 0] = int(all(pure(t) and reads(t) for t in _listed(full, b, h, u)))
        out[b, h, u, 1] = int(all(pure(t) for t in _listed(part, b, h, u)))
    return out


def _slot_moved(plan, tables, trial, g):
    """(qs, ks) of ``plan`` with one real slot of batch row 1 moved to another domain: a key slot
    on even trials, a query row on odd ones (the forgeries the table checks must catch)."""
    from dataclasses import replace

    qdom, kdom = plan.qs.dom.clone(), plan.ks.dom.clone()
    side = kdom if trial % 2 == 0 else qdom
    real = ((plan.ks.idx if side is kdom else plan.qs.tok)[1] >= 0).nonzero().flatten().cpu()
    slot = int(real[torch.randint(len(real), (1,), generator=g)])
    side[1, slot] = (int(side[1, slot]) + 1 + trial // 2) % (tables.dp - 1)
    return replace(plan.qs, dom=qdom), replace(plan.ks, dom=kdom)


@pytest.mark.parametrize("check_full", [True, False])
def test_table_checks_trust_exactly_the_tiles_they_should(compiled, check_full):
    """``launch_query_trust`` / ``launch_key_trust`` (what the forward, dq and dk/dv kernels are
    told they may trust in their run tables) against Python twins, on an honest plan and on plans
    whose slot labels were altered after planning: a key slot or a query row moved to another
    domain, in one batch row only. Every tile of both batch rows must match, and the forgeries must
    take trust away from some tiles (else they would test nothing)."""
    from domainguard.attention import GuardedAttention, KernelConfig
    from domainguard.kernels.backward import launch_backward_checks, launch_key_trust
    from domainguard.kernels.forward import launch_query_trust

    bm = bn = 16
    cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=1, use_tma=False,
                       dkdv=(("SUB_N", 32), ("SUB_M", 16), ("num_warps", 4), ("num_stages", 1)))
    guard = GuardedAttention(compiled, cfg)
    tables = guard.tables(0)
    plan = guard.plan(_layout(compiled, n=90, seed=4).to(DEV), 0, heads=2, dtype=torch.float32, head_dim=64)
    bkt = cfg.block_kt

    def both(qs, ks):
        got_q = launch_query_trust(qs, ks, plan.runs, tables, block_m=bm, block_n=bn, check_full=check_full)
        got_k = launch_key_trust(qs, ks, plan.runs_t, tables, block_m=bm, block_kt=bkt, check_full=check_full)
        want_q = _query_trust_expected(qs, ks, plan.runs, tables, bm, bn, check_full)
        want_k = _key_trust_expected(qs, ks, plan.runs_t, tables, bm, bkt, check_full)
        assert torch.equal(got_q.cpu().view_as(want_q), want_q)
        assert torch.equal(got_k.cpu().view_as(want_k), want_k)
        # The backward's single launch of both checks gives the same answers, and with ``merge`` (the
        # Gluon dq's) the merged runs the forward's check writes.
        fused_k, fused_q = launch_backward_checks(qs, ks, plan.runs, plan.runs_t, tables, block_m=bm, block_n=bn,
                                                  block_kt=bkt, check_full=check_full)
        assert torch.equal(fused_q.cpu().view_as(want_q), want_q)
        assert torch.equal(fused_k.cpu().view_as(want_k), want_k)
        merged_k, merged_q, merged = launch_backward_checks(qs, ks, plan.runs, plan.runs_t, tables, block_m=bm,
                                                            block_n=bn, block_kt=bkt, check_full=check_full,
                                                            merge=True)
        trust_f, merged_f = launch_query_trust(qs, ks, plan.runs, tables, block_m=bm, block_n=bn,
                                               check_full=check_full, merge=True)
        assert torch.equal(merged_q, trust_f) and torch.equal(merged_k, fused_k)
        counts = merged[:, 0].long()
        assert torch.equal(counts, merged_f[:, 0].long())
        rm = (merged.shape[1] - 1) // 3
        live = torch.arange(rm, device=merged.device)[None, :] < counts[:, None]  # entries past the count are unset
        for part in range(3):
            got, want = (m[:, 1 + part * rm: 1 + (part + 1) * rm] for m in (merged, merged_f))
            assert torch.equal(torch.where(live, got, 0), torch.where(live, want, 0))
        return want_q, want_k

    honest_q, honest_k = both(plan.qs, plan.ks)
    full, part = plan.runs
    assert torch.equal(honest_q[..., 0], full.num.cpu())  # an honest plan is trusted everywhere
    assert torch.equal(honest_q[..., 1], part.num.cpu() if check_full else torch.zeros_like(part.num.cpu()))
    lost_q = lost_k = 0
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        want_q, want_k = both(*_slot_moved(plan, tables, trial, g))
        assert torch.equal(want_q[0], honest_q[0]) and torch.equal(want_k[0], honest_k[0])
        lost_q += int((want_q != honest_q).sum())
        lost_k += int((want_k != honest_k).sum())
    assert lost_q > 0 and (lost_k > 0 or not check_full)


def _merged_cover(merged, shape, cols):
    """Decode ``launch_query_trust(..., merge=True)``'s merged runs into per-tile cover counts:
    ([B, Hm, Tq, cols] FULL count, PARTIAL count, number of runs with both parts)."""
    m = merged.cpu().view(*shape, -1)
    rm = (m.shape[-1] - 1) // 3
    full = torch.zeros(*shape, cols, dtype=torch.int32)
    part = torch.zeros_like(full)
    both = 0
    for b, h, t in torch.cartesian_prod(*(torch.arange(s) for s in shape)).tolist():
        row = m[b, h, t]
        for r in range(int(row[0])):
            s0, sm, s1 = (int(row[1 + j * rm + r]) for j in range(3))
            assert s0 <= sm <= s1
            full[b, h, t, s0:sm] += 1
            part[b, h, t, sm:s1] += 1
            both += s0 < sm < s1
    return full, part, both


def _runs_cover(runs, counts, cols):
    """Per-tile cover counts of the first ``counts`` [B, Hm, Tq] runs of ``runs``."""
    out = torch.zeros(*counts.shape, cols, dtype=torch.int32)
    start, end = runs.start.cpu(), runs.end.cpu()
    for b, h, t in torch.cartesian_prod(*(torch.arange(s) for s in counts.shape)).tolist():
        for r in range(int(counts[b, h, t])):
            out[b, h, t, int(start[b, h, t, r]):int(end[b, h, t, r])] += 1
    return out


@pytest.mark.parametrize("check_full", [True, False])
def test_merged_runs_cover_each_trusted_tile_once_with_its_kind(compiled, check_full):
    """The forward kernel walks the runs ``_trust_kernel`` merges (a FULL run and the PARTIAL run
    that starts where it ends, as one loop; the PARTIAL part masked by key index). On an honest
    plan and on plans altered after planning (a key or query slot moved to another domain; a run
    count wider than its table row), the merged runs must list exactly the tiles the trust counts
    let the kernels take, each once and with its kind, and nothing for an untrusted tile; and some
    runs must actually merge (else this would test nothing)."""
    from dataclasses import replace

    from domainguard.attention import GuardedAttention, KernelConfig
    from domainguard.kernels.forward import launch_kv_checks, launch_query_trust

    bm = bn = 16
    gen_kv = torch.Generator().manual_seed(17)
    cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=1, use_tma=False)
    guard = GuardedAttention(compiled, cfg)
    tables = guard.tables(0)
    plan = guard.plan(_layout(compiled, n=90, seed=4).to(DEV), 0, heads=2, dtype=torch.float32, head_dim=64)
    full, part = plan.runs
    cols = plan.ks.size // bn

    def check(qs, ks, runs):
        trust_only = launch_query_trust(qs, ks, runs, tables, block_m=bm, block_n=bn, check_full=check_full)
        trust, merged = launch_query_trust(qs, ks, runs, tables, block_m=bm, block_n=bn, check_full=check_full,
                                           merge=True)
        assert torch.equal(trust.cpu(), trust_only.cpu())
        # The forward's single launch (K/V into slot order beside the check) gives the same tables
        # and the same copies as the two launches it replaces.
        k, v = (torch.randn(qs.tok.shape[0], 2, 90, 64, generator=gen_kv).to(DEV) for _ in range(2))
        kp, vp, trust_kv, merged_kv = launch_kv_checks(k, v, qs, ks, runs, tables, block_m=bm, block_n=bn,
                                                       check_full=check_full)
        assert torch.equal(trust_kv.cpu(), trust.cpu())
        # (a merged row is written up to its count only: compared by what it covers)
        got_kv, got = (_merged_cover(m, runs[0].num.shape, cols) for m in (merged_kv, merged))
        assert torch.equal(got_kv[0], got[0]) and torch.equal(got_kv[1], got[1]) and got_kv[2] == got[2]
        assert torch.equal(kp, gather_rows(k, ks.tok)) and torch.equal(vp, gather_rows(v, ks.tok))
        want = _query_trust_expected(qs, ks, runs, tables, bm, bn, check_full)
        assert torch.equal(trust.cpu().view_as(want), want)
        got_full, got_part, both = _merged_cover(merged, runs[0].num.shape, cols)
        assert torch.equal(got_full, _runs_cover(runs[0], want[..., 0], cols))
        assert torch.equal(got_part, _runs_cover(runs[1], want[..., 1], cols))
        return want, both

    honest, both = check(plan.qs, plan.ks, plan.runs)
    assert honest[..., 0].sum() > 0
    if check_full:
        assert both > 0  # FULL runs with their PARTIAL tail merged
    g = torch.Generator().manual_seed(9)
    for trial in range(4):
        check(*_slot_moved(plan, tables, trial, g), plan.runs)
    # A run count wider than the table row: that tile is not trusted (its merged runs would
    # otherwise be read from, and written over, its neighbour's rows).
    t = int(full.num[0, 0].argmax())
    wide = full.num.clone()
    wide[0, 0, t] = full.start.shape[-1] + 1
    forged = (replace(full, num=wide), part)
    want, _ = check(plan.qs, plan.ks, forged)
    assert int(want[0, 0, t, 0]) == 0 and int(honest[0, 0, t, 0]) > 0
