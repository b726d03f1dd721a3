"""Tile tables against the dense reference: awkward lengths, random layouts, decode, reordering, FlexAttention."""

import random

import pytest
import torch

import domainguard as dg
from domainguard.blockmap import EMPTY, FULL, PARTIAL, build_blockmap, build_blockmap_from_attrs
from domainguard.layout import TokenAttrs
from domainguard.patterns import dense_mask, token_mask, rules_for
from domainguard.validate import check_blockmap, check_kinds

MIXED = """
domainguard: 1
name: blockmap-mixed
domains:
  system: {}
  docs:
    children: {public: {}, private: {}}
  tools: {}
  scratch: {}
  answer: {}
reads:
  docs: [system]
  tools: [system, public]
  scratch: [system, docs]
  answer: [system, public, tools]
layers:
  - layers: "1"
    reads: {answer: [system]}
patterns:
  default: {causal: true}
  public: {causal: true, window: 40, global_tokens: 3}
  private: {causal: true, stride: 17, block_local: 64}
  tools: {causal: false, window: 9, dilation: 3}
  scratch: {causal: true, random: {links: 3, seed: 7}, window: 5}
  system: {causal: false}
generation: {domain: answer}
"""

CAUSAL = """
domainguard: 1
name: blockmap-causal
domains: {a: {}, b: {}, c: {}, d: {}, e: {}, f: {}, g: {}, h: {}}
reads: {b: [a], c: [a, b], d: [a], e: [c, d], f: [a], g: [f, a], h: [a, b, c]}
patterns: {default: {causal: true}}
generation: {domain: h}
"""


@pytest.fixture(scope="module")
def mixed():
    return dg.compile(dg.loads_policy(MIXED), layers=2)


@pytest.fixture(scope="module")
def causal8():
    return dg.compile(dg.loads_policy(CAUSAL), layers=1)


def segment_ids(n, num_domains, rng, max_seg=120, pad_tail=0):
    """Domain ids [n] made of random-length segments; optional trailing padding."""
    out = []
    while len(out) < n - pad_tail:
        out += [rng.randrange(num_domains)] * rng.randint(1, max_seg)
    return out[: n - pad_tail] + [num_domains] * pad_tail


def random_layout(compiled, n, batch=2, seed=0, **kw):
    rng = random.Random(seed)
    rows = [segment_ids(n, compiled.num_domains, rng, pad_tail=(rng.randrange(n // 4 + 1) if b else 0), **kw) for b in range(batch)]
    return dg.Layout.from_ids(compiled, torch.tensor(rows))


def assert_sound(bm, mask, exact=False):
    res = check_kinds(bm.kinds[:, 0], mask, bm.block_q, bm.block_k)
    assert res["full_violations"] == 0 and res["empty_violations"] == 0, res
    if exact:
        assert res["loose_tiles"] == 0, res


@pytest.mark.parametrize("n", [1, 127, 129, 1000, 521])
@pytest.mark.parametrize("block", [64, 128])
def test_mixed_patterns_sound_at_awkward_lengths(mixed, n, block):
    lay = random_layout(mixed, n, seed=n + block)
    for layer in range(2):
        bm = build_blockmap(lay, mixed, layer, block_q=block, block_k=block)
        assert bm.kinds.shape == (2, 1, -(-n // block), -(-n // block))
        assert_sound(bm, dense_mask(lay, mixed, layer))


@pytest.mark.parametrize("n", [1, 127, 129, 1000, 521])
def test_causal_policy_tables_are_exact(causal8, n):
    lay = random_layout(causal8, n, seed=n)
    bm = build_blockmap(lay, causal8, 0, block_q=64, block_k=64)
    assert_sound(bm, dense_mask(lay, causal8, 0), exact=True)


def test_window_tables_exact_on_contiguous_layout(mixed):
    # one long segment per domain: spans are intervals, so window tables are exact
    pub = mixed.id_of("public")
    lay = dg.Layout.from_ids(mixed, torch.full((1, 700), pub))
    bm = build_blockmap(lay, mixed, 0, block_q=16, block_k=16)
    mask = dense_mask(lay, mixed, 0)
    assert_sound(bm, mask, exact=True)
    assert (bm.kinds == EMPTY).any() and (bm.kinds == FULL).any()


def test_random_layouts_many(mixed):
    rng = random.Random(1)
    for trial in range(12):
        n = rng.randint(1, 400)
        lay = random_layout(mixed, n, batch=3, seed=trial, max_seg=rng.choice([1, 3, 30, 200]))
        bq, bk = rng.choice([(64, 64), (128, 64), (64, 128), (32, 16)])
        for layer in range(2):
            bm = build_blockmap(lay, mixed, layer, block_q=bq, block_k=bk)
            assert_sound(bm, dense_mask(lay, mixed, layer))


def test_decode_query_slice(mixed):
    lay = random_layout(mixed, 300, seed=3).extend(5)
    for q_slice in (1, 5, 77, slice(10, 200)):
        mask = dense_mask(lay, mixed, 0, q_slice=q_slice)
        bm = build_blockmap(lay, mixed, 0, block_q=64, block_k=64, q_slice=q_slice)
        assert bm.q_len == mask.shape[1] and bm.kv_len == lay.seq_len
        assert_sound(bm, mask)
    # the last query row equals the last row of the full mask (causal alignment by index)
    full = dense_mask(lay, mixed, 0)
    assert torch.equal(dense_mask(lay, mixed, 0, q_slice=1)[:, 0], full[:, -1])


def test_reordered_tokens_give_permuted_mask(mixed):
    lay = random_layout(mixed, 333, batch=1, seed=5)
    attrs = lay.attrs()
    perm = torch.argsort(attrs.domain[0], stable=True)  # sort by domain: tiles become domain-pure
    sorted_attrs = TokenAttrs(*(t[:, perm] for t in attrs))
    rel = mixed.relation(0)
    rules = rules_for(mixed, 0)
    base = token_mask(attrs, attrs, rel, rules)
    assert torch.equal(token_mask(sorted_attrs, sorted_attrs, rel, rules), base[:, perm][:, :, perm])
    bm = build_blockmap_from_attrs(sorted_attrs, sorted_attrs, mixed, 0, block_q=64, block_k=64)
    assert check_blockmap(bm, mixed)["status"] == "PROVED"
    # sorting makes more tiles EMPTY than the natural order does
    natural = build_blockmap(lay, mixed, 0, block_q=64, block_k=64)
    assert (bm.kinds == EMPTY).sum() >= (natural.kinds == EMPTY).sum()


def test_flex_lists_match_kinds(mixed):
    lay = random_layout(mixed, 700, seed=9)
    bm = build_blockmap(lay, mixed, 0, block_q=64, block_k=64)
    for kind, num, idx in ((PARTIAL, bm.partial_num, bm.partial_idx), (FULL, bm.full_num, bm.full_idx)):
        assert num.dtype == idx.dtype == torch.int32
        for b in range(2):
            for t in range(bm.kinds.shape[2]):
                want = (bm.kinds[b, 0, t] == kind).nonzero().flatten().tolist()
                assert idx[b, 0, t, : num[b, 0, t]].tolist() == want


def test_matches_create_block_mask(causal8):
    from torch.nn.attention.flex_attention import create_block_mask

    lay = random_layout(causal8, 512, batch=2, seed=11)
    bm = build_blockmap(lay, causal8, 0, block_q=128, block_k=128)
    ref = create_block_mask(bm.mask_mod(), 2, 1, 512, 512, device="cpu", BLOCK_SIZE=128)
    assert torch.equal(bm.partial_num, ref.kv_num_blocks) and torch.equal(bm.full_num, ref.full_kv_num_blocks)
    for b in range(2):
        for t in range(4):
            n, f = int(bm.partial_num[b, 0, t]), int(bm.full_num[b, 0, t])
            assert bm.partial_idx[b, 0, t, :n].tolist() == sorted(ref.kv_indices[b, 0, t, :n].tolist())
            assert bm.full_idx[b, 0, t, :f].tolist() == sorted(ref.full_kv_indices[b, 0, t, :f].tolist())
    exported = bm.to_flex_block_mask()
    assert torch.equal(exported.kv_num_blocks, ref.kv_num_blocks)
    # the exported mask_mod is the dense reference
    dense = dense_mask(lay, causal8, 0)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(512), torch.arange(512), indexing="ij")
    assert torch.equal(bm.mask_mod()(b, torch.zeros_like(b), q, k), dense)


def test_per_head_patterns_need_heads():
    text = MIXED.replace("system: {causal: false}", "system: [{causal: true, window: 4, heads: \"0-1\"}, {causal: false}]")
    c = dg.compile(dg.loads_policy(text), layers=2)
    lay = random_layout(c, 200, seed=2)
    with pytest.raises(dg.LayoutError) as e:
        build_blockmap(lay, c, 0)
    assert e.value.code == "DG308"
    bm = build_blockmap(lay, c, 0, head=[0, 1, 2], block_q=32, block_k=32)
    assert bm.kinds.shape[1] == 3 and torch.equal(bm.kinds[:, 0], bm.kinds[:, 1])
    assert not torch.equal(bm.kinds[:, 0], bm.kinds[:, 2])
    assert check_blockmap(bm, c)["status"] == "PROVED"


def test_stats_and_no_dense_allocation(causal8):
    lay = random_layout(causal8, 4096, batch=1, seed=4)
    bm = build_blockmap(lay, causal8, 0)
    s = bm.stats()
    assert s["tiles"] == 32 * 32 and 0 < s["tile_sparsity"] < 1 and 0 < s["flops_saved"] < 1
    assert s["density_lower"] <= s["density_upper"]


@pytest.mark.gpu
def test_cuda_tables_equal_cpu_tables(mixed):
    lay = random_layout(mixed, 3000, seed=21)
    cpu = build_blockmap(lay, mixed, 0)
    gpu = build_blockmap(lay.to("cuda"), mixed, 0)
    assert gpu.kinds.is_cuda and torch.equal(gpu.kinds.cpu(), cpu.kinds)
    assert torch.equal(gpu.full_idx.cpu(), cpu.full_idx) and torch.equal(gpu.partial_num.cpu(), cpu.partial_num)


# --- the fused Triton builder (TRITON_INTERPRET=1 on the CPU, tests/conftest.py) -------------

TABLES = ("kinds", "partial_num", "partial_idx", "full_num", "full_idx")


def assert_same_tables(a, b):
    for name in TABLES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), name


def _on_gpu(x):
    if isinstance(x, dg.Layout):
        return x.to("cuda")
    if isinstance(x, TokenAttrs):
        return TokenAttrs(*(t.cuda() for t in x))
    return x


def both(*args, builder=build_blockmap, **kw):
    """(torch tables, Triton tables) of one build; Triton runs on the GPU where there is one."""
    fused_args = [_on_gpu(a) for a in args] if torch.cuda.is_available() else args
    return builder(*args, backend="torch", **kw), builder(*fused_args, backend="triton", **kw)


@pytest.mark.parametrize("n", [1, 127, 129, 1000, 521])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 128), (32, 64)])
def test_triton_tables_equal_torch_tables(mixed, causal8, n, blocks):
    bq, bk = blocks
    for compiled, layers in ((mixed, 2), (causal8, 1)):
        lay = random_layout(compiled, n, seed=n + bq)
        for layer in range(layers):
            ref, got = both(lay, compiled, layer, block_q=bq, block_k=bk)
            assert_same_tables(ref, got)
    assert_sound(ref, dense_mask(lay, causal8, 0))


def test_triton_tables_random_layouts(mixed):
    rng = random.Random(7)
    for trial in range(6):
        n = rng.randint(1, 300)
        lay = random_layout(mixed, n, batch=3, seed=100 + trial, max_seg=rng.choice([1, 3, 30, 200]))
        bq, bk = rng.choice([(64, 64), (128, 64), (16, 32), (32, 16)])
        for layer in range(2):
            assert_same_tables(*both(lay, mixed, layer, block_q=bq, block_k=bk))


def test_triton_decode_reordered_and_per_head(mixed):
    lay = random_layout(mixed, 300, seed=3).extend(5)
    for q_slice in (1, 5, slice(10, 200)):
        assert_same_tables(*both(lay, mixed, 0, block_q=16, block_k=64, q_slice=q_slice))
    attrs = lay.attrs()
    perm = torch.argsort(attrs.domain[0], stable=True)
    sorted_attrs = TokenAttrs(*(t[:, perm] for t in attrs))
    ref, got = both(sorted_attrs, sorted_attrs, mixed, 1, builder=build_blockmap_from_attrs, block_q=64, block_k=64)
    assert_same_tables(ref, got)
    assert check_blockmap(got, mixed)["status"] == "PROVED"
    text = MIXED.replace("system: {causal: false}", "system: [{causal: true, window: 4, heads: \"0-1\"}, {causal: false}]")
    c = dg.compile(dg.loads_policy(text), layers=2)
    ref, got = both(random_layout(c, 200, seed=2), c, 0, head=[0, 2, 1], block_q=32, block_k=32)
    assert_same_tables(ref, got)
    assert got.kinds.shape[1] == 3 and not torch.equal(got.kinds[:, 0], got.kinds[:, 1])


@pytest.mark.parametrize("num_domains", [63, 64])
def test_triton_domain_bitmask_limit(num_domains):
    # 63 domains + padding fill all 64 bits of a domain set (bit 63 is int64's sign bit)
    names = [f"d{i}" for i in range(num_domains)]
    rng = random.Random(num_domains)
    reads = {n: sorted(rng.sample(names[:i], min(i, 5))) for i, n in enumerate(names) if i}
    text = "domainguard: 1\nname: wide\ndomains: {" + ", ".join(f"{n}: {{}}" for n in names) + "}\n"
    text += "reads: {" + ", ".join(f"{k}: [{', '.join(v)}]" for k, v in reads.items()) + "}\n"
    text += f"patterns: {{default: {{causal: true}}}}\ngeneration: {{domain: {names[-1]}}}\n"
    c = dg.compile(dg.loads_policy(text), layers=1)
    lay = random_layout(c, 700, seed=1, max_seg=12)
    if num_domains == 63:
        ref, got = both(lay, c, 0, block_q=32, block_k=32)
        assert_same_tables(ref, got)
        assert_sound(ref, dense_mask(lay, c, 0), exact=True)
    else:
        with pytest.raises(ValueError):
            build_blockmap(lay, c, 0, backend="triton")
        assert build_blockmap(lay, c, 0, backend="auto").kinds.shape == (2, 1, 6, 6)


def test_triton_rules_override_and_fallback(mixed):
    from domainguard.patterns import MaskRule, Window, causal

    lay = random_layout(mixed, 400, seed=8)
    rules = [tuple(MaskRule(restrict=(causal(),), union=(Window(5, 2),)) for _ in range(mixed.num_domains))]
    a, b = both(lay.attrs(), lay.attrs(), mixed, 0, builder=build_blockmap_from_attrs, heads=[0], rules=rules, block_q=32, block_k=32)
    assert_same_tables(a, b)
    # a constant beyond int32 has no Triton form: "auto" keeps the torch builder, "triton" refuses
    huge = [tuple(MaskRule(union=(Window(1 << 31),)) for _ in range(mixed.num_domains))]
    kw = dict(heads=[0], rules=huge, block_q=32, block_k=32)
    with pytest.raises(ValueError):
        build_blockmap_from_attrs(lay.attrs(), lay.attrs(), mixed, 0, backend="triton", **kw)
    assert_same_tables(
        build_blockmap_from_attrs(lay.attrs(), lay.attrs(), mixed, 0, backend="torch", **kw),
        build_blockmap_from_attrs(lay.attrs(), lay.attrs(), mixed, 0, backend="auto", **kw),
    )
    with pytest.raises(ValueError):
        build_blockmap(lay, mixed, 0, backend="numpy")


@pytest.mark.gpu
def test_cuda_auto_builder_is_fused_and_equal(mixed, causal8):
    for compiled, layers in ((mixed, 2), (causal8, 1)):
        lay = random_layout(compiled, 5000, seed=31).to("cuda")
        for layer in range(layers):
            assert_same_tables(build_blockmap(lay, compiled, layer, backend="torch"), build_blockmap(lay, compiled, layer))
            assert_same_tables(
                build_blockmap(lay, compiled, layer, block_q=64, block_k=128, q_slice=slice(100, 3000), backend="torch"),
                build_blockmap(lay, compiled, layer, block_q=64, block_k=128, q_slice=slice(100, 3000), backend="triton"),
            )
