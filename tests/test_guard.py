"""dg.guard on tiny random Llama and BERT models: isolation, generate() with the KV cache, batches, refusals."""

import copy
import importlib

import pytest
import torch

import domainguard as dg
from domainguard.errors import LayoutError, ModelError
from domainguard.guard import forbidden_sources, guard_state, is_guarded, unguard
from domainguard.leaktest import bitwise_equal

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

POLICY = """
domainguard: 1
name: guard-test
domains:
  system: {}
  notes: {}
  secret: {}
  answer: {}
reads:
  notes: [system]
  secret: [system]
  answer: [system, notes]
forbid:
  - flow: {from: secret, to: answer}
  - flow: {from: secret, to: notes}
patterns:
  default: {causal: true}
generation: {domain: answer}
positions: %s
"""
SYSTEM, NOTES, SECRET, ANSWER = range(4)
LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one thread is fastest, and immune to other processes competing for cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compiled(positions="per_domain", text=POLICY, layers=LAYERS):
    return dg.compile(dg.loads_policy(text % positions if "%s" in text else text), layers=layers)


def tiny_llama(layers=LAYERS, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=LAYERS, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


# secret tokens sit before the protected ones, so a dense causal model would leak them
DOMS = torch.tensor([[SYSTEM, SYSTEM, SECRET, SECRET, SECRET, NOTES, NOTES, ANSWER, ANSWER]])


def ids_for(doms, seed=1):
    return torch.randint(0, 97, doms.shape, generator=torch.Generator().manual_seed(seed))


def poisoned(ids, doms, domain=SECRET, seed=2):
    noise = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(doms == domain, noise, ids)


def protected(doms):
    return (doms == NOTES) | (doms == ANSWER)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_forward_is_bitwise_isolated_and_dense_is_not(make):
    model = make()
    dense = copy.deepcopy(model)
    g = dg.guard(model, compiled())
    assert g is model and is_guarded(g)
    ids = ids_for(DOMS)
    bad = poisoned(ids, DOMS)
    a = g(input_ids=ids, domain_ids=DOMS, output_hidden_states=True)
    b = g(input_ids=bad, domain_ids=DOMS, output_hidden_states=True)
    p = protected(DOMS)
    assert bitwise_equal(a.logits[p], b.logits[p])
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert bitwise_equal(ha[p], hb[p])
    assert not bitwise_equal(a.logits[DOMS == SECRET], b.logits[DOMS == SECRET])  # the poison did something
    assert not bitwise_equal(dense(input_ids=ids).logits[p], dense(input_ids=bad).logits[p])


def test_nan_and_inf_in_forbidden_embeddings_do_not_reach_protected_tokens():
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    emb = g.get_input_embeddings()(ids).detach()
    clean = g(inputs_embeds=emb, domain_ids=DOMS).logits
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = emb.masked_fill((DOMS == SECRET)[..., None], value)
        out = g(inputs_embeds=bad, domain_ids=DOMS).logits
        assert bitwise_equal(out[protected(DOMS)], clean[protected(DOMS)])
        assert torch.isfinite(out[protected(DOMS)]).all()


def test_guarded_model_matches_dense_where_the_policy_allows_everything():
    open_policy = """
domainguard: 1
name: open
domains: {a: {}, b: {}}
reads: {a: [b], b: [a]}
patterns: {default: {causal: true}}
generation: {domain: b}
"""
    model = tiny_llama()
    dense = copy.deepcopy(model)
    g = dg.guard(model, compiled(text=open_policy))
    doms = torch.tensor([[0, 1, 0, 1, 1, 0, 1]])
    ids = ids_for(doms)
    torch.testing.assert_close(g(input_ids=ids, domain_ids=doms).logits, dense(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_generate_with_kv_cache_matches_full_recompute_and_stays_isolated():
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    out = g.generate(ids, domain_ids=DOMS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = out[:, ids.shape[1]:]
    assert new.shape == (1, 6)
    # Without a cache, every generated token is recomputed from scratch in the generation domain.
    full = torch.cat([DOMS, torch.full((1, 6), ANSWER)], 1)
    logits = g(input_ids=out, domain_ids=full, use_cache=False).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:-1].argmax(-1), new[0])
    # Poisoning the secret changes nothing the answer generates.
    out2 = g.generate(poisoned(ids, DOMS), domain_ids=DOMS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out2[:, ids.shape[1]:], new)


def _layout_fields(lay):
    return [getattr(lay, f) for f in ("domain_ids", "index", "position_ids", "domain_rank", "valid")]


@pytest.mark.parametrize("positions", ["global", "per_domain", "reach"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_decoding_extends_the_previous_layout_only_when_it_equals_a_rebuild(monkeypatch, positions, with_mask):
    """generate() steps reuse the previous step's layout, extended; every layout a step runs under
    equals the one built from scratch, and anything that could make them differ (other domain ids,
    a padding mask that changes or marks a new token as padding) rebuilds."""
    G = importlib.import_module("domainguard.guard")  # the package re-exports a function of that name

    c = compiled(positions)
    built, used = [], []
    real_build = G.build_layout

    def counting_build(*a, **kw):
        built.append(a[2])
        return real_build(*a, **kw)

    monkeypatch.setattr(G, "build_layout", counting_build)
    real_step = G._step_layout

    def recording_step(state, ids, total, mask=None):
        lay = real_step(state, ids, total, mask)
        used.append((lay, ids.clone(), total, None if mask is None else mask.clone()))
        return lay

    monkeypatch.setattr(G, "_step_layout", recording_step)
    pad = c.pad_id
    doms = torch.tensor([[pad, SYSTEM, NOTES, SECRET, ANSWER], [SYSTEM, SECRET, NOTES, ANSWER, ANSWER]])
    ids = ids_for(doms)
    kw = {"attention_mask": (doms != pad).long()} if with_mask else {}
    g = dg.guard(tiny_llama(), c)
    out = g.generate(ids, domain_ids=doms, max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)
    # the prompt and the first generated token are built; the four later steps extend
    assert built == [5, 6], built
    for lay, d, total, mask in used:
        fresh = real_build(c, d, total, mask)
        assert all(torch.equal(a, b) for a, b in zip(_layout_fields(lay), _layout_fields(fresh)))
    # the same tokens come out when every step rebuilds its layout
    monkeypatch.setattr(G, "_RECENT_LAYOUTS", 0)
    again = g.generate(ids, domain_ids=doms, max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)
    assert torch.equal(out, again)
    monkeypatch.setattr(G, "_RECENT_LAYOUTS", 4)

    # Direct steps: a remembered call is extended only when nothing it was built from changed.
    state = guard_state(g)
    state.recent.clear()
    mask6 = torch.ones(2, 6, dtype=torch.long)
    mask6[0, 0] = 0
    m = (lambda k: torch.cat([mask6, torch.ones(2, k - 6, dtype=torch.long)], 1)) if with_mask else (lambda k: None)
    G._step_layout(state, doms, 6, m(6))
    built.clear()
    G._step_layout(state, doms, 7, m(7))
    assert built == []  # extended
    changed = doms.clone()
    changed[1, 1] = NOTES  # other ids of the same shape: rebuilt
    lay = G._step_layout(state, changed, 8, m(8))
    assert built == [8] and lay.domain_ids[1, 1] == NOTES
    changed[1, 1] = SYSTEM  # the caller's tensor changed in place since: compared by value, rebuilt
    lay = G._step_layout(state, changed, 9, m(9))
    assert built == [8, 9] and lay.domain_ids[1, 1] == SYSTEM
    if with_mask:
        bad = m(10)
        bad[1, 9] = 0  # a new token marked as padding: rebuilt, and padded as asked
        lay = G._step_layout(state, changed, 10, bad)
        assert built == [8, 9, 10] and not bool(lay.valid[1, 9])
        prefix = m(11)
        prefix[1, 2] = 0  # the remembered prefix's padding changed: rebuilt
        lay = G._step_layout(state, changed, 11, prefix)
        assert built == [8, 9, 10, 11] and not bool(lay.valid[1, 2])


def test_generate_refuses_a_prompt_not_ending_in_the_generation_domain():
    g = dg.guard(tiny_llama(), compiled())
    doms = DOMS[:, :-2]  # ends with notes
    with pytest.raises(ModelError) as e:
        g.generate(ids_for(doms), domain_ids=doms, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert e.value.code == "DG505"


def test_generate_refuses_a_masked_last_prompt_token():
    """The first generated token comes from the last position, whose residual stream holds its own token even
    when it is masked as padding: a masked secret there would choose the answer."""
    g = dg.guard(tiny_llama(), compiled())
    doms = torch.tensor([[SYSTEM, SYSTEM, NOTES, ANSWER, SECRET]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with pytest.raises(ModelError) as e:
        g.generate(ids_for(doms), domain_ids=doms, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   pad_token_id=0)
    assert e.value.code == "DG505" and "masked" in str(e.value)


def test_generate_checks_the_prompt_end_before_the_first_token():
    """The first token comes from the prefill's logits: a prompt ending in a secret token must be refused
    before it is chosen (before, one new token came back unchecked, and a streamer got it)."""
    from transformers.generation.streamers import BaseStreamer

    class Seen(BaseStreamer):
        def __init__(self):
            self.got = []

        def put(self, value):
            self.got.append(value)

        def end(self):
            pass

    g = dg.guard(tiny_llama(), compiled())
    doms = torch.tensor([[SYSTEM, NOTES, ANSWER, SECRET]])
    for n in (1, 3):
        seen = Seen()
        with pytest.raises(ModelError) as e:
            g.generate(ids_for(doms), domain_ids=doms, max_new_tokens=n, do_sample=False, pad_token_id=0,
                       streamer=seen)
        assert e.value.code == "DG505" and seen.got == []


def test_continuing_with_the_cache_needs_the_whole_attention_mask():
    """generate(sequences, past_key_values=cache) without a full-length attention_mask feeds the whole sequence
    again on top of its own cache; the re-fed secret tokens would be labelled as generated and read by the
    answer (measured: 4 different continuations over 6 secret poisonings). Refused; with the mask it is isolated."""
    g = dg.guard(tiny_llama(), compiled())
    doms = torch.tensor([[SYSTEM, NOTES, SECRET, SECRET, SECRET, ANSWER]])
    ids = ids_for(doms)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    conts = set()
    for seed in range(3):
        first = g.generate(poisoned(ids, doms, seed=seed), domain_ids=doms, return_dict_in_generate=True, **kw)
        with pytest.raises(ModelError) as e:
            g.generate(first.sequences, domain_ids=doms, past_key_values=first.past_key_values, **kw)
        assert e.value.code == "DG514" and "past domain_ids" in str(e.value)
        again = g.generate(poisoned(ids, doms, seed=seed), domain_ids=doms, return_dict_in_generate=True, **kw)
        out = g.generate(again.sequences, domain_ids=doms, past_key_values=again.past_key_values,
                         attention_mask=torch.ones_like(again.sequences), **kw)
        conts.add(tuple(out[0, again.sequences.shape[1]:].tolist()))
    assert len(conts) == 1


@pytest.mark.parametrize("option", [
    {"watermarking_config": {"context_width": 4, "seeding_scheme": "selfhash"}}, {"max_new_tokens": None},
    {"max_new_tokens": None, "max_length": 14}, {"min_length": 12}, {"custom_generate": "x"},
    {"assistant_early_exit": 1},
], ids=["watermark-width-4", "no-max-new-tokens", "max-length", "min-length", "custom-generate", "early-exit"])
def test_generation_options_that_count_or_hash_prompt_tokens_are_refused(option):
    """A watermark seeded by the last 4 tokens reads prompt tokens (measured: 6 different outputs over 12
    secret poisonings); max_length and min_length count them, so the answer's length tells the secret's;
    custom decoding and early exit run code the guard has not checked."""
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    kw = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0, **option}
    with pytest.raises(ModelError) as e:
        g.generate(ids, domain_ids=DOMS, **{k: v for k, v in kw.items() if v is not None})
    assert e.value.code == "DG515"
    assert g.config.num_hidden_layers == LAYERS  # refused before anything changed the model
    out = g.generate(ids, domain_ids=DOMS, max_new_tokens=2, do_sample=False, pad_token_id=0,
                     watermarking_config={"context_width": 1})  # seeded by the last token only
    assert out.shape[1] == ids.shape[1] + 2


@pytest.mark.parametrize("option", [
    {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"encoder_repetition_penalty": 1.2},
    {"bad_words_ids": [[5, 6]]}, {"sequence_bias": {(5, 6): -1.0}}, {"prompt_lookup_num_tokens": 2},
])
def test_generation_options_that_read_the_prompt_are_refused(option):
    """These logits processors look at every prompt token: with them the secret's contents choose the answer
    (measured: repetition_penalty=1.3 changed 4 of 6 generated tokens with the secret)."""
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    with pytest.raises(ModelError) as e:
        g.generate(ids, domain_ids=DOMS, max_new_tokens=3, do_sample=False, pad_token_id=0, **option)
    assert e.value.code == "DG515"
    g.generation_config.repetition_penalty = 1.5  # shipped in a model's generation_config: refused too
    with pytest.raises(ModelError) as e:
        g.generate(ids, domain_ids=DOMS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert e.value.code == "DG515"
    g.generation_config.repetition_penalty = 1.0
    out = g.generate(ids, domain_ids=DOMS, max_new_tokens=3, do_sample=False, pad_token_id=0,
                     bad_words_ids=[[5], [7]])  # single tokens read nothing
    assert out.shape == (1, ids.shape[1] + 3)
    plain = unguard(g)
    assert "generate" not in plain.__dict__


def test_prompt_reading_generation_options_are_found_wherever_they_are_set():
    from transformers import GenerationConfig

    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)

    def code(*args, **kw):
        with pytest.raises(ModelError) as e:
            g.generate(ids, *args, domain_ids=DOMS, max_new_tokens=2, do_sample=False, pad_token_id=0, **kw)
        return e.value.code

    assert code(GenerationConfig(repetition_penalty=1.3)) == "DG515"  # a config passed by position
    assert code(prefix_allowed_tokens_fn=lambda b, seq: [int(seq[3])]) == "DG515"
    assert code(stop_strings=["x"]) == "DG515"
    g.generation_config.repetition_penalty = 1.3  # transformers fills a given config's unset fields from this
    assert code(generation_config=GenerationConfig(max_new_tokens=2)) == "DG515"
    out = g.generate(ids, domain_ids=DOMS, max_new_tokens=2, do_sample=False, pad_token_id=0, repetition_penalty=1.0)
    assert out.shape[1] == ids.shape[1] + 2  # the call's own setting wins
    g.generation_config.repetition_penalty = 1.0
    g.generate(ids, domain_ids=DOMS, max_new_tokens=2, do_sample=False, pad_token_id=0,
               sequence_bias=[[[5], -1.0]])  # one token in the list format: reads no prompt


def test_a_copy_of_the_guards_own_cache_is_accepted():
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    with torch.no_grad():
        cache = g(input_ids=ids, domain_ids=DOMS, use_cache=True).past_key_values
    full = torch.cat([DOMS, torch.tensor([[ANSWER]])], 1)
    a = g(input_ids=torch.tensor([[3]]), domain_ids=full, past_key_values=copy.deepcopy(cache)).logits
    b = g(input_ids=torch.tensor([[3]]), domain_ids=full, past_key_values=cache).logits
    assert torch.equal(a, b)


def test_a_kv_cache_the_guard_did_not_fill_is_refused():
    g = dg.guard(tiny_llama(), compiled())
    dense = tiny_llama()
    ids = ids_for(DOMS)
    nxt = torch.tensor([[3]])
    full = torch.cat([DOMS, torch.tensor([[ANSWER]])], 1)
    cache = dense(input_ids=ids, use_cache=True).past_key_values  # keys and values computed without the guard
    with pytest.raises(ModelError) as e:
        g(input_ids=nxt, domain_ids=full, past_key_values=cache)
    assert e.value.code == "DG514" and "not filled" in str(e.value)
    with pytest.raises(ModelError) as e:
        g.generate(ids, domain_ids=DOMS, past_key_values=dense(input_ids=ids, use_cache=True).past_key_values,
                   max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert e.value.code == "DG514"
    # Filled by the guard under other domain ids (the secret labelled notes): refused as well.
    relabelled = torch.where(DOMS == SECRET, NOTES, DOMS)
    cache = g(input_ids=ids, domain_ids=relabelled, use_cache=True).past_key_values
    with pytest.raises(ModelError) as e:
        g(input_ids=nxt, domain_ids=full, past_key_values=cache)
    assert e.value.code == "DG514" and "other domain ids" in str(e.value)
    # The guard's own cache, same ids: decoding goes on, equal to a recompute.
    cache = g(input_ids=ids, domain_ids=DOMS, use_cache=True).past_key_values
    step = g(input_ids=nxt, domain_ids=full, past_key_values=cache).logits[:, -1]
    again = g(input_ids=torch.cat([ids, nxt], 1), domain_ids=full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, again, rtol=1e-5, atol=1e-5)


def test_batches_of_different_layouts_match_rows_run_alone():
    g = dg.guard(tiny_llama(), compiled())
    pad = compiled().pad_id
    rows = [
        [SYSTEM, SECRET, SECRET, NOTES, NOTES, ANSWER, ANSWER],
        [NOTES, SYSTEM, ANSWER],
        [SECRET, SYSTEM, SYSTEM, NOTES, ANSWER],
    ]
    n = max(map(len, rows))
    doms = torch.tensor([[pad] * (n - len(r)) + r for r in rows])  # left padding, as for generation
    ids = ids_for(doms)
    mask = (doms != pad).long()
    batched = g(input_ids=ids, domain_ids=doms, attention_mask=mask).logits
    for i, r in enumerate(rows):
        alone = g(input_ids=ids[i:i + 1, n - len(r):], domain_ids=torch.tensor([r])).logits
        torch.testing.assert_close(batched[i:i + 1, n - len(r):], alone, rtol=1e-5, atol=1e-5)
    gen = g.generate(ids, domain_ids=doms, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = g.generate(ids[i:i + 1, n - len(r):], domain_ids=torch.tensor([r]), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
        assert torch.equal(gen[i, n:], alone[0, len(r):])


def test_bert_batch_with_right_padding_matches_rows_run_alone():
    g = dg.guard(tiny_bert(), compiled())
    pad = compiled().pad_id
    rows = [[SYSTEM, SECRET, NOTES, ANSWER, ANSWER], [NOTES, SYSTEM]]
    n = max(map(len, rows))
    doms = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    ids = ids_for(doms)
    batched = g(input_ids=ids, domain_ids=doms).logits
    for i, r in enumerate(rows):
        alone = g(input_ids=ids[i:i + 1, :len(r)], domain_ids=torch.tensor([r])).logits
        torch.testing.assert_close(batched[i:i + 1, :len(r)], alone, rtol=1e-5, atol=1e-5)


def test_per_domain_positions_reach_the_model():
    # Under per_domain positions a segment's outputs do not depend on where it starts.
    g = dg.guard(tiny_bert(), compiled("per_domain"))
    notes = ids_for(torch.zeros(1, 3, dtype=torch.long))
    a = g(input_ids=notes, domain_ids=torch.full((1, 3), NOTES)).logits
    pre = torch.cat([ids_for(torch.zeros(1, 4, dtype=torch.long), seed=5), notes], 1)
    b = g(input_ids=pre, domain_ids=torch.tensor([[SECRET] * 4 + [NOTES] * 3])).logits[:, 4:]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unguard_restores_the_dense_model():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    g = dg.guard(model, compiled())
    unguard(g)
    assert not is_guarded(g)
    ids = ids_for(DOMS)
    assert torch.equal(g(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_a_deep_copy_of_a_guarded_model_stays_guarded():
    g = dg.guard(tiny_llama(), compiled())
    c = copy.deepcopy(g)
    assert is_guarded(c)
    ids = ids_for(DOMS)
    assert torch.equal(c(input_ids=ids, domain_ids=DOMS).logits, g(input_ids=ids, domain_ids=DOMS).logits)
    with pytest.raises(ModelError):
        c(input_ids=ids)


def test_guard_copy_leaves_the_original_alone():
    model = tiny_llama()
    g = dg.guard(model, compiled(), copy=True)
    assert g is not model and not is_guarded(model) and is_guarded(g)


def test_forbidden_sources_follow_the_verifier():
    f = forbidden_sources(compiled())
    assert SECRET in f[ANSWER] and SECRET in f[NOTES]
    assert SYSTEM not in f[ANSWER] and NOTES not in f[ANSWER]


# --- refusals -------------------------------------------------------------------------------------
def code_of(fn):
    with pytest.raises((ModelError, LayoutError)) as e:
        fn()
    return e.value.code


def test_unknown_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=97, n_positions=64))
    assert code_of(lambda: dg.guard(gpt2, compiled())) == "DG501"
    assert code_of(lambda: dg.guard(torch.nn.Linear(2, 2), compiled())) == "DG501"


def test_layer_count_mismatch_is_refused():
    assert code_of(lambda: dg.guard(tiny_llama(layers=2), compiled())) == "DG502"


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}])
def test_rotary_scaling_by_batch_length_is_refused(rope):
    """Dynamic rotary scaling rescales every token's frequencies by the batch's longest position, which
    counts forbidden tokens too (measured: 3 against 20 secret tokens moved the answer's logits)."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_scaling=rope)
    with pytest.raises(ModelError) as e:
        dg.guard(LlamaForCausalLM(cfg), compiled())
    assert e.value.code == "DG502" and "dynamic" in str(e.value)


def test_bert_as_decoder_is_refused():
    cfg = BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, is_decoder=True)
    assert code_of(lambda: dg.guard(BertForMaskedLM(cfg), compiled())) == "DG502"


def test_non_causal_pattern_on_a_causal_lm_is_refused():
    text = POLICY.replace("default: {causal: true}", "default: {causal: true}\n  notes: {window: 4}")
    assert code_of(lambda: dg.guard(tiny_llama(), compiled(text=text))) == "DG509"
    dg.guard(tiny_bert(), compiled(text=text))  # an encoder attends both ways anyway


def test_guarding_twice_is_refused():
    g = dg.guard(tiny_llama(), compiled())
    assert code_of(lambda: dg.guard(g, compiled())) == "DG508"


def test_inputs_without_or_with_bad_domain_ids_are_refused():
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    assert code_of(lambda: g(input_ids=ids)) == "DG503"
    assert code_of(lambda: g(input_ids=ids, domain_ids=DOMS.float())) == "DG503"
    assert code_of(lambda: g(input_ids=ids[:, :4], domain_ids=DOMS)) == "DG503"  # more ids than tokens
    assert code_of(lambda: g(input_ids=ids, domain_ids=DOMS + 10)) == "DG303"  # LayoutError: unknown id
    # fewer domain ids than tokens: the rest would be generated, so the last given one must be the answer
    assert code_of(lambda: g(input_ids=ids, domain_ids=DOMS[:, :6])) == "DG505"


def test_custom_masks_and_positions_are_refused():
    g = dg.guard(tiny_llama(), compiled())
    ids = ids_for(DOMS)
    n = ids.shape[1]
    assert code_of(lambda: g(input_ids=ids, domain_ids=DOMS, attention_mask=torch.ones(1, 1, n, n))) == "DG504"
    assert code_of(lambda: g(input_ids=ids, domain_ids=DOMS, position_ids=torch.arange(n)[None] + 3)) == "DG506"


def test_a_submodule_called_alone_fails_closed():
    g = dg.guard(tiny_llama(), compiled())
    with pytest.raises(ModelError) as e:
        g.model(input_ids=ids_for(DOMS))  # the inner LlamaModel still runs guarded attention
    assert e.value.code == "DG510"


def test_attention_that_bypasses_the_interface_withholds_the_output():
    model = tiny_llama()
    g = dg.guard(model, compiled())
    attn = g.model.layers[1].self_attn

    class Bypass(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return attn.o_proj(attn.v_proj(hidden_states).repeat(1, 1, 2)), None

    g.model.layers[1].self_attn = Bypass()
    with pytest.raises(ModelError) as e:
        g(input_ids=ids_for(DOMS), domain_ids=DOMS)
    assert e.value.code == "DG507" and "[1]" in e.value.message


def test_attention_dropout_in_training_mode_is_refused():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)
    g = dg.guard(LlamaForCausalLM(cfg), compiled())
    g.train()
    assert code_of(lambda: g(input_ids=ids_for(DOMS), domain_ids=DOMS)) == "DG512"


def test_guard_state_of_an_unguarded_model_is_an_error():
    assert code_of(lambda: guard_state(tiny_llama())) == "DG508"
