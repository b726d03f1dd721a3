"""Empirical leak test and the position channel, on tiny random Llama and BERT models."""

import copy

import pytest
import torch

import domainguard as dg
from domainguard.errors import ModelError
from domainguard.leaktest import POISONS, bitwise_equal, compare_dense, leak_test, position_channel, synthetic_inputs

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

POLICY = """
domainguard: 1
name: leak-test
domains:
  system: {}
  tool: {}
  web: {}
  answer: {}
reads:
  tool: [system]
  web: [system]
  answer: [system, tool]
forbid:
  - flow: {from: web, to: answer}
patterns:
  default: {causal: true}
generation: {domain: answer}
positions: %s
"""
LAYERS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compiled(positions="per_domain"):
    return dg.compile(dg.loads_policy(POLICY % positions), layers=LAYERS)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def tiny_bert():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      max_position_embeddings=64)).eval()


def test_bitwise_equal_compares_bytes():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert bitwise_equal(a, a.clone())
    assert not torch.equal(a, a.clone())  # why bytes: NaN != NaN for torch.equal
    assert not bitwise_equal(a, torch.tensor([1.0, float("nan"), -0.0]))
    assert not bitwise_equal(a, a.double())
    assert not bitwise_equal(a, a[:2])


@pytest.mark.parametrize("make, causal", [(tiny_llama, True), (tiny_bert, False)], ids=["llama", "bert"])
def test_guarded_rate_is_zero_and_dense_rate_is_positive(make, causal):
    c = compiled()
    model = dg.guard(make(), c)
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=3, seed=1, causal=causal)
    guarded, dense = compare_dense(model, ids, doms, generate_tokens=2 if causal else 0)
    assert guarded.guarded and not dense.guarded
    assert guarded.trials == dense.trials == 2 * len(POISONS) * len(guarded.by_source)
    assert guarded.leaks == 0 and guarded.rate == 0.0, guarded.examples
    assert dense.rate > 0, dense.to_dict()
    # every poison really ran, and at least the embedding poisons leak densely
    assert all(v["trials"] > 0 for v in guarded.by_poison.values())
    for p in ("nan", "inf", "-inf"):
        assert dense.by_poison[p]["leaks"] > 0
    d = guarded.to_dict()
    assert d["rate"] == 0.0 and d["outputs"][:2] == ["logits", "hidden_states"]
    assert ("generate" in d["outputs"]) == causal


def test_the_forbidden_source_is_what_leaks_densely():
    c = compiled()
    model = dg.guard(tiny_llama(), c)
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=3, seed=3)
    _, dense = compare_dense(model, ids, doms, poisons=("tokens",), trials=None)
    assert set(dense.by_source) == {"web", "tool", "answer"}  # a domain some present domain may not read
    assert dense.by_source["web"]["leaks"] > 0


def test_a_leaky_guard_is_caught(monkeypatch):
    """Break the guard (dense attention behind its back): the leak test must notice."""
    import sys

    guard_mod = sys.modules["domainguard.guard"]
    c = compiled()
    model = dg.guard(tiny_llama(), c)

    def dense_attend(state, q, k, v, layout, layer, scale):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    monkeypatch.setattr(guard_mod, "_attend", dense_attend)
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=3, seed=1)
    report = leak_test(model, c, ids, doms, poisons=("tokens", "nan"), trials=6)
    assert report.leaks > 0 and report.examples


def test_unknown_poison_and_nothing_to_test_are_errors():
    c = compiled()
    model = dg.guard(tiny_llama(), c)
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=2)
    with pytest.raises(ModelError) as e:
        leak_test(model, c, ids, doms, poisons=("acid",))
    assert e.value.code == "DG530"
    only_system = torch.zeros_like(doms)
    with pytest.raises(ModelError) as e:
        leak_test(model, c, ids, only_system)
    assert e.value.code == "DG531"


def test_synthetic_inputs_end_with_the_generation_domain():
    c = compiled()
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=2, batch=3, seed=7)
    assert ids.shape == doms.shape == (3, 2 * c.num_domains)
    assert (doms[:, -1] == c.generation_id).all()
    assert len({tuple(r) for r in doms.tolist()}) > 1  # rows differ in order


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_global_positions_leak_the_length_of_a_forbidden_segment(make):
    model = dg.guard(make(), compiled("global"))
    result = position_channel(model, compiled("global"))
    assert result["changed"] and result["protected"] == "answer" and result["source"] == "web"
    assert result["context"] == "system"
    assert "logits" in result["outputs_changed"]


@pytest.mark.parametrize("positions", ["per_domain", "reach"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_per_domain_and_reach_positions_close_the_length_channel(make, positions):
    model = dg.guard(make(), compiled(positions))
    result = position_channel(model, compiled(positions), lengths=(1, 7))
    assert result["positions"] == positions and result["context"] == "system"
    assert not result["changed"], result


def test_position_channel_needs_a_guarded_model():
    with pytest.raises(ModelError):
        position_channel(tiny_llama(), compiled())


def test_leak_test_leaves_the_model_unchanged():
    c = compiled()
    model = dg.guard(tiny_llama(), c)
    ids, doms = synthetic_inputs(c, 97, tokens_per_domain=2)
    model(input_ids=ids, domain_ids=doms, output_hidden_states=True)  # transformers installs its own hooks
    before = copy.deepcopy(model.state_dict())
    hooks = [list(b._forward_hooks) for b in model.model.layers]
    leak_test(model, c, ids, doms, poisons=("hidden-nan",), trials=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [list(b._forward_hooks) for b in model.model.layers] == hooks  # the poisoning hook was removed


def test_synthetic_inputs_with_random_segment_lengths():
    """Certification leak-tests segments of 1-16 tokens in another order per row (a model that mixes positions
    a fixed distance apart, or only in long inputs, is not exercised by 4 tokens per domain)."""
    from domainguard.leaktest import synthetic_inputs

    c = dg.compile(dg.loads_policy(
        "domainguard: 1\nname: s\ndomains: {a: {}, b: {}, c: {}, d: {}}\nreads: {d: [a]}\n"
        "patterns: {default: {causal: true}}\ngeneration: {domain: d}\n"), layers=1)
    ids, doms = synthetic_inputs(c, 50, tokens_per_domain=(1, 16), batch=3, seed=4)
    assert ids.shape == doms.shape and doms.shape[0] == 3
    runs = []
    for row in doms.tolist():
        assert row[-1] == c.id_of("d")  # generation domain last
        segs = [(row[0], 1)]
        for x in row[1:]:
            segs[-1:] = [(x, segs[-1][1] + 1)] if x == segs[-1][0] else [segs[-1], (x, 1)]
        assert sorted(x for x, _ in segs) == list(range(4)) and all(1 <= n <= 16 for _, n in segs)
        runs.append(sorted(n for _, n in segs))
    assert runs[0] == runs[1] == runs[2]  # the same lengths, dealt differently
    assert len(set(tuple(r) for r in doms.tolist())) > 1
