"""Guard a Hugging Face transformer: every attention call runs under the frozen policy (DESIGN §6).

``guard(model, compiled)`` registers domainguard's attention function and mask function
with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` under the name
``"domainguard"``, switches the model to it, and wraps the model's ``forward`` so that
domain ids travel with the inputs::

    model = dg.guard(model, compiled)
    out = model(input_ids=ids, domain_ids=dom)                  # dom: LongTensor [B, N]
    gen = model.generate(ids, domain_ids=dom, max_new_tokens=8) # generated tokens: generation domain

How the pieces fit:

* The wrapped ``forward`` builds one ``Layout`` for the whole key sequence (cached tokens
  plus new ones) on every call, takes position ids from it (global or per-domain, as the
  policy says) and hands it to the attention function through the model's ``**kwargs``.
  ``domain_ids`` always covers the sequence from its first token (like a 2-D
  ``attention_mask``); tokens past its end are generated tokens, of the generation domain.
* The attention function refuses to run without that context (a submodule called on its
  own fails closed) and counts its calls: a forward in which some layer's attention did
  not go through it raises instead of returning.
* The mask function returns no mask: the policy's mask (relation, patterns, padding) is
  built from the layout inside guarded attention. The model's own causal mask is not
  lost: guarding a causal LM requires every pattern of the policy to be causal.

Only architectures whose attention is known to dispatch through the interface are
accepted (``ARCHITECTURES``); anything else is refused with a ModelError. The graph audit
(``domainguard.audit``) checks the rest of the model for ops that mix positions.

Error codes (ModelError): DG501 unsupported architecture, DG502 unsupported configuration
(sliding window, BERT as a decoder, layer count differs from the policy's), DG503 bad
inputs (domain ids missing or malformed), DG504 a mask or cache the guard cannot take,
DG505 tokens generated from a token outside the generation domain, DG506 position ids
other than the layout's, DG507 a layer's attention bypassed the guard (output withheld),
DG508 not guarded / already guarded, DG509 a non-causal pattern on a causal LM, DG510
guarded attention called without a layout, DG511 an attention module the guard did not
register, DG512 attention dropout or arguments the guard does not support, DG513 a
prepared mask reached guarded attention, DG514 the KV cache out of step with the layout or
not filled by the guard, DG515 a generation option that reads every prompt token (repetition
penalties, n-gram bans, custom logits processors, prompt lookup): decoding would see tokens of
domains the generation domain may not read.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import ModelError

__all__ = [
    "IMPLEMENTATION",
    "ARCHITECTURES",
    "Architecture",
    "GuardState",
    "guard",
    "unguard",
    "guard_state",
    "is_guarded",
    "architecture_of",
    "forbidden_sources",
]

IMPLEMENTATION = "domainguard"
_CONTEXT_KEY = "domainguard_context"
_STATE_ATTR = "_domainguard"
_LAYER_ATTR = "_domainguard_layer"  # on each attention module: its layer (travels with deepcopy)


# --- architectures ---------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """What the guard needs to know about one model family."""

    name: str
    causal: bool  # the model's own mask is causal (decoder) rather than bidirectional (encoder)
    attention_modules: Callable[[nn.Module], list[nn.Module]]  # the self-attention modules, in layer order
    blocks: Callable[[nn.Module], list[nn.Module]]  # the transformer blocks, in layer order
    num_layers: Callable[[object], int]
    num_heads: Callable[[object], int]


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return model if base is None else base


def _llama_blocks(model: nn.Module) -> list[nn.Module]:
    return list(_base(model).layers)


def _llama_attention(model: nn.Module) -> list[nn.Module]:
    return [block.self_attn for block in _llama_blocks(model)]


def _bert_blocks(model: nn.Module) -> list[nn.Module]:
    return list(_base(model).encoder.layer)


def _bert_attention(model: nn.Module) -> list[nn.Module]:
    return [block.attention.self for block in _bert_blocks(model)]


def _rope_type(config) -> str | None:
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if isinstance(value, dict):
            return value.get("rope_type") or value.get("type")
    return None


def _check_llama(config) -> str | None:
    if getattr(config, "sliding_window", None):
        return "sliding-window attention is not supported"
    if _rope_type(config) in ("dynamic", "longrope"):
        # Frequencies recomputed from the longest position in the batch: that length counts every domain.
        return (f"rotary scaling {_rope_type(config)!r} is not supported: it rescales every token's frequencies "
                "by the longest sequence in the batch, forbidden segments included")
    types_ = getattr(config, "layer_types", None)
    if types_ and any(t != "full_attention" for t in types_):
        return f"layer types {sorted(set(types_))} are not supported (only full attention)"
    return None


def _check_bert(config) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "BERT used as a decoder or with cross-attention is not supported"
    return None


def _layers(config) -> int:
    return config.num_hidden_layers


def _heads(config) -> int:
    return config.num_attention_heads


# model_type -> (architecture, config check returning why a config is refused, or None)
ARCHITECTURES: dict[str, tuple[Architecture, Callable[[object], str | None]]] = {
    "llama": (Architecture("llama", True, _llama_attention, _llama_blocks, _layers, _heads), _check_llama),
    "bert": (Architecture("bert", False, _bert_attention, _bert_blocks, _layers, _heads), _check_bert),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The supported architecture of ``model``, or a ModelError saying why it is refused."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ModelError(
            f"{type(model).__name__} is not a Hugging Face transformers model",
            code="DG501",
            hint="Guard a transformers PreTrainedModel (Llama-family causal LM or BERT-family encoder).",
        )
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        raise ModelError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}",
            code="DG501",
            hint="Only architectures whose every attention call is known to go through the attention interface "
            "can be guarded.",
        )
    arch, check = entry
    problem = check(config)
    if problem:
        raise ModelError(f"{type(model).__name__}: {problem}", code="DG502")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{type(model).__name__}: encoder-decoder models are not supported", code="DG502")
    return arch


# --- state -----------------------------------------------------------------------------
@dataclass(eq=False)
class GuardState:
    """Everything the guard attaches to a model (as ``model._domainguard``)."""

    compiled: object
    attention: object  # domainguard.attention.GuardedAttention
    architecture: Architecture
    original_forward: Callable
    original_implementation: str | None
    backend: str = "auto"  # "auto" | "reference" | "triton" (GuardedAttention's backends)
    certificate: object | None = None  # set by load_certified
    authenticated: bool = False  # set by load_certified: its signature was checked against a given public key
    recent: list = field(default_factory=list)  # _LayoutStep of the latest calls (decoding extends them)

    @property
    def num_layers(self) -> int:
        return self.compiled.num_layers


@dataclass(eq=False)
class _CallContext:
    """One forward call: its layout and which layers' attention ran under the guard."""

    state: GuardState
    layout: object
    calls: list[int]


def guard_state(model: nn.Module) -> GuardState:
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, GuardState):
        raise ModelError(f"{type(model).__name__} is not guarded", code="DG508", hint="Call dg.guard(model, compiled).")
    return state


def is_guarded(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE_ATTR, None), GuardState)


# --- the attention and mask functions registered with transformers --------------------------
def _attend(state: GuardState, q, k, v, layout, layer: int, scale):
    """Guarded attention of one layer: the frozen kernels on a GPU, the plain-PyTorch reference on CPU.

    (On CPU the Triton interpreter is far too slow for whole models; ``guard(backend=...)`` overrides.)
    """
    backend = state.backend
    if backend == "auto" and q.device.type == "cpu":
        backend = "reference"
    return state.attention(q, k, v, layout, layer, q_slice=q.shape[2], scale=scale, backend=backend)


def guarded_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The ``AttentionInterface`` entry: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] → ([B, Nq, Hq, D], None)."""
    ctx = kwargs.get(_CONTEXT_KEY)
    if not isinstance(ctx, _CallContext):
        raise ModelError(
            f"guarded attention in {type(module).__name__} was called without a domain layout",
            code="DG510",
            hint="Call the guarded model itself with domain_ids=..., not one of its submodules.",
        )
    layer = getattr(module, _LAYER_ATTR, None)
    if layer is None:
        raise ModelError(f"attention module {type(module).__name__} is not one the guard registered", code="DG511")
    if dropout:
        raise ModelError(
            f"attention dropout ({dropout}) is not supported under the guard",
            code="DG512",
            hint="Call model.eval() (or set the attention dropout to 0) before running a guarded model.",
        )
    for name in ("sliding_window", "s_aux", "softcap"):
        if kwargs.get(name) is not None:
            raise ModelError(f"attention argument {name!r} is not supported under the guard", code="DG512")
    # INVARIANT: the registered mask function returns None and forward refuses 4-D masks,
    # so no mask built outside the policy can reach this point.
    if attention_mask is not None:
        raise ModelError("a prepared attention mask reached guarded attention", code="DG513")
    n = ctx.layout.domain_ids.shape[1]
    if key.shape[2] != n:
        raise ModelError(
            f"layer {layer}: {key.shape[2]} keys but the layout has {n} tokens (cache out of step with domain_ids)",
            code="DG514",
        )
    out = _attend(ctx.state, query, key, value, ctx.layout, layer, scaling)
    ctx.calls[layer] += 1
    return out.transpose(1, 2).contiguous(), None


def guarded_mask(*args, **kwargs):
    """The ``AttentionMaskInterface`` entry: no mask.

    The mask a guarded model runs under is the policy's — relation, patterns and padding —
    built from the layout inside guarded attention; returning None here keeps transformers
    from building (and us from trusting) a second one.
    """
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, guarded_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, guarded_mask)


# --- layouts for one forward call ---------------------------------------------------------
def _past_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    raise ModelError(f"unsupported past_key_values of type {type(past).__name__}; use a transformers Cache", code="DG504")


def full_domain_ids(compiled, domain_ids: torch.Tensor, total: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Domain ids for all ``total`` tokens: ``domain_ids`` covers the first ones, the rest are generated.

    A generated token is of the generation domain, and so must be the token whose
    logits produced the first of them (DESIGN §2, decoding).
    """
    if not isinstance(domain_ids, torch.Tensor) or domain_ids.dim() != 2 or domain_ids.dtype not in (
        torch.int64,
        torch.int32,
    ):
        raise ModelError(
            f"domain_ids must be an integer tensor [batch, tokens]; got "
            f"{type(domain_ids).__name__} {tuple(getattr(domain_ids, 'shape', ()))}",
            code="DG503",
        )
    domain_ids = domain_ids.long()
    given = domain_ids.shape[1]
    if given > total:
        raise ModelError(f"domain_ids has {given} tokens but the sequence has {total}", code="DG503")
    if given == total:
        return domain_ids
    gen = compiled.generation_id
    if gen is None:
        raise ModelError(
            f"domain_ids covers {given} of {total} tokens and the policy names no generation domain",
            code="DG503",
            hint="Pass domain ids for every token, or add `generation: {domain: ...}` to the policy.",
        )
    if given == 0:
        raise ModelError("domain_ids is empty", code="DG503")
    last = domain_ids[:, given - 1]
    if valid is not None and not bool(valid[:, given - 1].all()):
        # The first generated token comes from the last position's logits, and a masked position still
        # carries its own token in the residual stream: it must be a real token of the generation domain.
        row = int((~valid[:, given - 1]).nonzero()[0])
        raise ModelError(
            f"row {row}: the last prompt token is masked as padding, but tokens are generated from it",
            code="DG505",
            hint="Pad prompts on the left (tokenizer.padding_side = 'left') so every row ends in a real token "
                 "of the generation domain.",
        )
    bad = (last != gen).nonzero().flatten().tolist()
    if bad:
        raise ModelError(
            f"row {bad[0]}: the last prompt token is of domain "
            f"{compiled.domains[int(last[bad[0]])] if int(last[bad[0]]) < compiled.num_domains else 'pad'}, "
            f"but tokens are generated from it into {compiled.domains[gen]!r}",
            code="DG505",
            hint="End every prompt with a token of the generation domain (Layout.from_segments does this).",
        )
    tail = torch.full((domain_ids.shape[0], total - given), gen, dtype=torch.long, device=domain_ids.device)
    return torch.cat([domain_ids, tail], dim=1)


def build_layout(compiled, domain_ids: torch.Tensor, total: int, attention_mask=None):
    """The Layout of a whole key sequence of ``total`` tokens (padding from a 2-D attention mask)."""
    from .layout import Layout

    pad = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ModelError(
                "a guarded model takes only a 2-D padding attention_mask [batch, tokens]",
                code="DG504",
                hint="The attention pattern comes from the policy; pass padding as a 0/1 mask.",
            )
        if attention_mask.shape[1] != total:
            raise ModelError(
                f"attention_mask has {attention_mask.shape[1]} tokens but the sequence has {total}", code="DG504"
            )
        pad = attention_mask == 0
    if pad is not None:
        domain_ids = domain_ids.to(pad.device)
    ids = full_domain_ids(compiled, domain_ids, total, None if pad is None else ~pad)
    return Layout.from_ids(compiled, ids, pad_mask=pad)


@dataclass(eq=False)
class _LayoutStep:
    """A layout built for one call, with what it was built from (copies, so later changes to the
    caller's tensors cannot make a stale layout look current)."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    total: int
    layout: object


_RECENT_LAYOUTS = 4


def _continues(step: _LayoutStep, ids, total: int, mask) -> bool:
    """Is a call with ``ids``, ``total`` tokens and padding ``mask`` the remembered ``step`` plus
    generated tokens only (see ``_step_layout``)?"""
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.dtype in (torch.int64, torch.int32)):
        return False
    if not (ids.shape[1] < step.total < total and step.ids.shape == ids.shape and step.ids.device == ids.device):
        return False
    if (step.mask is None) != (mask is None):
        return False
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.shape == (step.mask.shape[0], total)
                                 and mask.device == step.mask.device and mask.dtype == step.mask.dtype):
        return False
    if not torch.equal(step.ids, ids):
        return False
    return mask is None or (torch.equal(mask[:, : step.total], step.mask) and bool(mask[:, step.total :].all()))


def _step_layout(state: GuardState, domain_ids: torch.Tensor, total: int, attention_mask=None):
    """``build_layout``, or, for a decoding step, the previous step's layout extended by the new tokens.

    Extended only when it is certain to equal a fresh build: a remembered call with the same
    domain ids (compared by value), fewer tokens, at least one of them generated already (so the
    generation-domain check of ``full_domain_ids`` passed for this prompt), and a padding mask
    that is absent both times or equal on the remembered tokens and all ones on the new.
    """
    for i, step in enumerate(state.recent):
        if _continues(step, domain_ids, total, attention_mask):
            layout = step.layout.extend(total - step.total)
            state.recent[i] = _LayoutStep(step.ids, None if attention_mask is None else attention_mask.clone(), total,
                                          layout)
            return layout
    layout = build_layout(state.compiled, domain_ids, total, attention_mask)
    state.recent.insert(0, _LayoutStep(domain_ids.clone(), None if attention_mask is None else attention_mask.clone(),
                                       total, layout))
    del state.recent[_RECENT_LAYOUTS:]
    return layout


_CACHE_MARK = "_domainguard_filled"


def _check_cache(state: GuardState, cache, layout, cached: int) -> None:
    """A KV cache that holds tokens must be one this guard filled, under the layout the new call extends:
    keys and values computed outside the guard (or under other domain ids) carry whatever they read."""
    if cache is None or cached == 0:
        return
    mark = getattr(cache, _CACHE_MARK, None)
    ids = layout.domain_ids[:, :cached]
    if mark is None or mark[0]() is not state:
        raise ModelError("the KV cache was not filled by this guarded model", code="DG514",
                         hint="Start from an empty cache (or none) and let the guarded model fill it.")
    had = mark[1][:, :cached]  # a cache cropped since it was filled holds a prefix of what it was filled under
    if had.shape != ids.shape or not torch.equal(had.to(ids.device), ids):
        raise ModelError("the KV cache was filled under other domain ids (or padding) than this call's",
                         code="DG514", hint="Pass the same domain_ids (and attention_mask) for every step of a generation.")


def _mark_cache(cache, state: GuardState, layout) -> None:
    if cache is not None and _past_length(cache) == layout.domain_ids.shape[1]:
        try:
            # A weak reference: a deep copy of the cache (to reuse a prompt's) keeps pointing at this guard.
            setattr(cache, _CACHE_MARK, (weakref.ref(state), layout.domain_ids.clone()))
        except (AttributeError, TypeError):
            pass  # a cache that cannot carry the mark is refused when it comes back


def _guarded_forward(self, input_ids=None, *, domain_ids=None, **kwargs):
    """Run the wrapped model with its domain layout; refuse if any layer bypassed the guard."""
    state = guard_state(self)
    if domain_ids is None:
        raise ModelError(
            "a guarded model needs domain_ids=LongTensor[batch, tokens] with every input",
            code="DG503",
            hint="Build them with dg.Layout.from_segments(...) or pass one domain id per token.",
        )
    tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        raise ModelError("pass input_ids or inputs_embeds", code="DG503")
    n_new = tokens.shape[1]
    # transformers >= 5.24 passes the KV cache to the model as ``cache``; earlier versions as
    # ``past_key_values``.
    past = kwargs.get("past_key_values")
    cache = past if past is not None else kwargs.get("cache")
    cached = _past_length(cache)
    total = cached + n_new
    if isinstance(domain_ids, torch.Tensor):
        domain_ids = domain_ids.to(tokens.device)
        unlabelled = total - max(domain_ids.shape[-1], cached) if domain_ids.dim() == 2 else 0
        if cached and unlabelled > 1:
            # A decode step adds one generated token to a cache. More tokens past domain_ids are the prompt fed
            # again on top of its own cache (generate() without a full-length attention_mask does that):
            # labelling them as generated would let the answer read them.
            raise ModelError(
                f"{unlabelled} new tokens after a KV cache of {cached} fall past domain_ids "
                f"({domain_ids.shape[-1]} tokens) and would be taken as generated",
                code="DG514",
                hint="After a cache pass only the new tokens (to generate(): the whole attention_mask), and domain "
                     "ids for every token that was not generated.")
    layout = _step_layout(state, domain_ids, total, kwargs.get("attention_mask"))
    _check_cache(state, cache, layout, cached)
    positions = layout.position_ids[:, cached:].to(tokens.device)
    given = kwargs.get("position_ids")
    if given is not None and not torch.equal(given.to(positions.device).expand_as(positions), positions):
        raise ModelError(
            "position_ids differ from the layout's; under the guard positions come from the policy "
            f"(positions: {state.compiled.positions})",
            code="DG506",
            hint="Leave position_ids out.",
        )
    kwargs["position_ids"] = positions
    ctx = _CallContext(state, layout, [0] * state.num_layers)
    kwargs[_CONTEXT_KEY] = ctx
    out = state.original_forward(input_ids=input_ids, **kwargs)
    missed = [l for l, c in enumerate(ctx.calls) if c == 0]
    if missed:
        raise ModelError(
            f"attention of layer(s) {missed} did not run through guarded attention; output withheld",
            code="DG507",
            hint="The model bypasses transformers' attention interface; it cannot be guarded.",
        )
    for filled in (cache, getattr(out, "past_key_values", None)):
        _mark_cache(filled, state, layout)
    return out


# Generation options whose logits processors (or candidate generators) read the prompt's token ids,
# forbidden segments included: decoding would choose tokens by what the model may not read.
_PROMPT_READERS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "prompt_lookup_num_tokens": None,
    "stop_strings": None,
}
# Callables and objects generate() hands the whole sequence to.
_PROMPT_CALLBACKS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model")


def _token_lists(name: str, value) -> list:
    """The token sequences of ``bad_words_ids`` ([[ids], ...]) or ``sequence_bias`` ({(ids): bias} or [[ids, bias], ...])."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [list(k) if isinstance(k, (list, tuple)) else [k] for k in value]
    if name == "sequence_bias":
        return [list(e[0]) if isinstance(e, (list, tuple)) and e and isinstance(e[0], (list, tuple)) else [e]
                for e in value]
    return [list(e) if isinstance(e, (list, tuple)) else [e] for e in value]


def _check_generation(model, args: tuple, kwargs: dict) -> None:
    """Refuse generate() options that look at prompt tokens outside the model (DG515). An option counts
    where the call sets it, or else where the given generation config or the model's own sets it
    (transformers fills a given config's unset fields from the model's)."""
    import inspect

    try:
        bound = inspect.signature(type(model).generate).bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    given = {**bound.pop("kwargs", {}), **{k: v for k, v in bound.items() if k != "self"}}
    configs = [c for c in (given.get("generation_config"), getattr(model, "generation_config", None)) if c is not None]

    def values(name):
        if name in given:
            return [given[name]]
        return [getattr(c, name, None) for c in configs]

    def refuse(what: str, hint: str):
        raise ModelError(f"generate({what}) reads every prompt token, also those of domains the generation "
                         "domain may not read", code="DG515", hint=hint)

    for name in _PROMPT_CALLBACKS:
        if given.get(name):
            refuse(f"{name}=...", "Leave it out; apply such logic to the guarded model's logits outside generate().")
    for name, neutral in _PROMPT_READERS.items():
        for value in values(name):
            if value is not None and value != neutral:
                refuse(f"{name}={value!r}", f"Leave {name} unset (check the model's generation_config too).")
    for name in ("bad_words_ids", "sequence_bias"):
        for value in values(name):
            if any(len(seq) > 1 for seq in _token_lists(name, value)):
                refuse(f"{name}=... with sequences of several tokens", "Use single-token entries only.")
    for value in values("watermarking_config"):
        width = value.get("context_width", 1) if isinstance(value, dict) else getattr(value, "context_width", 1)
        if value is not None and width != 1:  # its green list is seeded by the last context_width tokens
            refuse(f"watermarking_config=... with context_width={width}", "Use context_width=1 (seeded by the "
                   "last token only, which is of the generation domain).")
    for name in ("custom_generate", "trust_remote_code", "assistant_early_exit"):
        if given.get(name) not in (None, False):
            raise ModelError(f"generate({name}=...) runs decoding the guard has not checked", code="DG515",
                             hint=f"Leave {name} out.")
    if all(v is None for v in values("max_new_tokens")):
        raise ModelError("generate() without max_new_tokens stops at max_length, which counts every prompt token: "
                         "how many tokens it generates tells how long the forbidden segments are", code="DG515",
                         hint="Pass max_new_tokens=N.")
    if any(values("min_length")):
        raise ModelError("generate(min_length=...) counts every prompt token: when EOS becomes possible tells how "
                         "long the forbidden segments are", code="DG515", hint="Use min_new_tokens instead.")


def _guarded_generate(self, *args, **kwargs):
    _check_generation(self, args, kwargs)
    domain_ids = kwargs.get("domain_ids")
    if isinstance(domain_ids, torch.Tensor) and domain_ids.dim() == 2 and domain_ids.shape[1]:
        # The first token is chosen from the prefill's last logits, before any decode step checks the prompt's
        # end: check it now (a secret or padded last token would pick it, and a streamer would already have it).
        mask = kwargs.get("attention_mask")
        usable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= domain_ids.shape[1]
        full_domain_ids(guard_state(self).compiled, domain_ids, domain_ids.shape[1] + 1,
                        (mask != 0).to(domain_ids.device) if usable else None)
    return type(self).generate(self, *args, **kwargs)


# --- guard / unguard ---------------------------------------------------------------------
def _check_patterns_causal(compiled, arch: Architecture, heads: int) -> None:
    """A causal LM must never see future tokens: every pattern must keep ``causal``."""
    for layer in range(compiled.num_layers):
        for domain in range(compiled.num_domains):
            for head in range(heads):
                pat = compiled.pattern(domain, layer, head)
                if pat is None or not pat.causal:
                    raise ModelError(
                        f"{arch.name} is a causal model but the policy's pattern for domain "
                        f"{compiled.domains[domain]!r} (layer {layer}, head {head}) is not causal",
                        code="DG509",
                        hint="Add `patterns: {default: {causal: true}}` (and causal: true on every other pattern).",
                    )


def guard(model: nn.Module, compiled, *, copy: bool = False, backend: str = "auto") -> nn.Module:
    """Guard ``model`` (in place, or a deep copy with ``copy=True``) under ``compiled``; return it.

    ``backend``: "auto" (the frozen Triton kernels on a GPU, the reference on CPU),
    "reference" or "triton". Raises ModelError for an unsupported architecture, a layer
    count that differs from the compiled policy's, or (for a causal LM) a policy pattern
    that is not causal.
    """
    if backend not in ("auto", "reference", "triton"):
        raise ModelError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}", code="DG503")
    from .attention import GuardedAttention

    arch = architecture_of(model)
    if is_guarded(model):
        raise ModelError(f"{type(model).__name__} is already guarded", code="DG508", hint="Call unguard(model) first.")
    config = model.config
    layers = arch.num_layers(config)
    if compiled.num_layers != layers:
        raise ModelError(
            f"the policy was compiled for {compiled.num_layers} layers but the model has {layers}",
            code="DG502",
            hint=f"Compile with dg.compile(policy, layers={layers}).",
        )
    if arch.causal:
        _check_patterns_causal(compiled, arch, arch.num_heads(config))
    if copy:
        import copy as _copy

        model = _copy.deepcopy(model)
    modules = arch.attention_modules(model)
    if len(modules) != layers:
        raise ModelError(f"found {len(modules)} attention modules for {layers} layers", code="DG502")
    _register()
    state = GuardState(
        compiled=compiled,
        attention=GuardedAttention(compiled),
        architecture=arch,
        original_forward=model.forward,
        original_implementation=getattr(config, "_attn_implementation", None),
        backend=backend,
    )
    for i, m in enumerate(modules):
        setattr(m, _LAYER_ATTR, i)
    model.set_attn_implementation(IMPLEMENTATION)
    setattr(model, _STATE_ATTR, state)
    # An instance attribute shadows the class's forward, so __call__ and generate() go through it.
    model.forward = types.MethodType(_guarded_forward, model)
    if hasattr(type(model), "generate"):
        model.generate = types.MethodType(_guarded_generate, model)
    return model


def unguard(model: nn.Module) -> nn.Module:
    """Undo ``guard`` (for baselines in experiments): original forward and attention implementation."""
    state = guard_state(model)
    del model.forward
    model.__dict__.pop("generate", None)
    delattr(model, _STATE_ATTR)
    for m in state.architecture.attention_modules(model):
        if hasattr(m, _LAYER_ATTR):
            delattr(m, _LAYER_ATTR)
    if state.original_implementation is not None:
        model.set_attn_implementation(state.original_implementation)
    return model


# --- what a domain may not read -------------------------------------------------------------
def forbidden_sources(compiled) -> dict[int, list[int]]:
    """For each domain R: the domains whose contents can reach no hidden state of R.

    Read off the verifier's reach table (decode feedback included, so this is the
    stricter set): nothing a token of R holds at any layer may depend on a token of S.
    """
    from .verify import reach_table

    reach = reach_table(compiled.flow)  # [node, source]
    d = compiled.num_domains
    return {r: [s for s in range(d) if not reach[r, s]] for r in range(d)}
