"""Empirical leak test: poison what a protected domain may not read, compare its outputs bitwise (DESIGN §6).

A *trial* picks a source domain S, a poison and a seed, rewrites the contents of every
token of S and runs the model again. Protected outputs are those of tokens whose domain
may not read S at any depth (``guard.forbidden_sources``): their logits and the hidden
states after every layer, compared as raw bytes (so a NaN that appears, or a -0.0 that
becomes 0.0, counts). A trial *leaks* when any protected byte changed; the leakage rate
is leaks / trials.

Poisons: ``tokens`` (fresh random token ids), ``nan`` / ``inf`` / ``-inf`` (the token
embeddings of S), ``hidden-nan`` / ``hidden-inf`` (S's hidden states after a random
layer, through a forward hook). With ``generate_tokens > 0`` a causal LM also generates
greedily from the clean and the poisoned prompt and the generated ids and every step's
logits are compared (the KV-cache path).

For a guarded model the rate must be 0; the same model with dense attention shows what
the guard prevents (``compare_dense``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelError
from .guard import architecture_of, forbidden_sources, is_guarded

__all__ = ["POISONS", "LeakReport", "leak_test", "compare_dense", "synthetic_inputs", "bitwise_equal"]

POISONS = ("tokens", "nan", "inf", "-inf", "hidden-nan", "hidden-inf")
_FILL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
         "hidden-nan": float("nan"), "hidden-inf": float("inf")}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN equals the identical NaN; -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@dataclass(frozen=True)
class LeakReport:
    """The outcome of one leak test."""

    model: str
    guarded: bool
    trials: int
    leaks: int
    by_poison: dict
    by_source: dict
    outputs: tuple[str, ...]
    seed: int
    seconds: float
    examples: tuple[dict, ...] = field(default_factory=tuple)  # the first few leaking trials

    @property
    def rate(self) -> float:
        return self.leaks / self.trials if self.trials else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "guarded": self.guarded,
            "trials": self.trials,
            "leaks": self.leaks,
            "rate": self.rate,
            "by_poison": self.by_poison,
            "by_source": self.by_source,
            "outputs": list(self.outputs),
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "examples": list(self.examples),
        }


# --- inputs --------------------------------------------------------------------------------
def synthetic_inputs(compiled, vocab_size: int, *, tokens_per_domain: int | tuple[int, int] = 4, batch: int = 2,
                     seed: int = 0, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with a segment of every domain in a random order per row.

    ``tokens_per_domain``: each segment's length, or (lo, hi) for random lengths in that range
    (every row has the same lengths, dealt to its domains in another order, so rows align).
    For a causal model with a generation domain, each row ends with that domain so the
    prompt is one the guard accepts for generation. Returns (input_ids, domain_ids), [B, N].
    """
    g = torch.Generator().manual_seed(seed)
    d = compiled.num_domains
    gen = compiled.generation_id if causal else None
    if isinstance(tokens_per_domain, int):
        lengths = [tokens_per_domain] * d
    else:
        lo, hi = tokens_per_domain
        lengths = [int(x) for x in torch.randint(lo, hi + 1, (d,), generator=g)]
    rows = []
    for _ in range(batch):
        order = [int(x) for x in torch.randperm(d, generator=g)]
        if gen is not None:
            order.remove(gen)
            order.append(gen)
        dealt = [lengths[int(i)] for i in torch.randperm(d, generator=g)]
        rows.append([dom for dom, n in zip(order, dealt) for _ in range(n)])
    domain_ids = torch.tensor(rows, dtype=torch.long)
    input_ids = torch.randint(0, vocab_size, domain_ids.shape, generator=g)
    return input_ids, domain_ids


# --- running ---------------------------------------------------------------------------------
def _causal(model) -> bool:
    return architecture_of(model).causal


def _run(model, guarded: bool, domain_ids, *, input_ids=None, inputs_embeds=None, attention_mask=None):
    kwargs = dict(attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    if guarded:
        kwargs["domain_ids"] = domain_ids
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    if _causal(model):
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    tensors = {}
    main = getattr(out, "logits", None)
    if main is None:
        main = out.last_hidden_state
    tensors["logits"] = main
    for i, h in enumerate(out.hidden_states or ()):
        tensors[f"hidden_states[{i}]"] = h
    return tensors


def _generate(model, guarded: bool, input_ids, domain_ids, attention_mask, n: int):
    kwargs = dict(max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                  pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    if guarded:
        kwargs["domain_ids"] = domain_ids
    with torch.no_grad():
        out = model.generate(input_ids, **kwargs)
    result = {"generated": out.sequences[:, input_ids.shape[1]:]}
    for i, step in enumerate(out.logits):
        result[f"generate.logits[{i}]"] = step
    return result


def _hooked(model, layer: int, positions: torch.Tensor, value: float):
    """A forward hook that overwrites the hidden states at ``positions`` [B, N] after block ``layer``."""
    block = architecture_of(model).blocks(model)[layer]

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.masked_fill(positions[:, :, None].to(hidden.device), value)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return block.register_forward_hook(hook)


def _protected_mask(compiled, domain_ids: torch.Tensor, valid: torch.Tensor, source: int) -> torch.Tensor:
    forbidden = forbidden_sources(compiled)
    readers = [r for r, srcs in forbidden.items() if source in srcs]
    mask = torch.zeros_like(domain_ids, dtype=torch.bool)
    for r in readers:
        mask |= domain_ids == r
    return mask & valid


def leak_test(
    model: nn.Module,
    compiled,
    input_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    trials: int | None = None,
    rounds: int = 2,
    poisons: tuple[str, ...] = POISONS,
    generate_tokens: int = 0,
    seed: int = 0,
) -> LeakReport:
    """Run ``trials`` poisoning trials on ``model`` (guarded or dense) and count the leaking ones.

    ``domain_ids`` [B, N] name every token's domain (the guarded model also runs under
    them; a dense model ignores them). Trials cycle, in a seeded order, over every pair of
    a source (a domain present that some present domain may not read) and a poison;
    ``trials`` defaults to ``rounds`` rounds.
    """
    start = time.perf_counter()
    unknown = [p for p in poisons if p not in POISONS]
    if unknown:
        raise ModelError(f"unknown poison(s) {unknown}; choose from {', '.join(POISONS)}", code="DG530")
    guarded = is_guarded(model)
    model.eval()
    device = next(model.parameters()).device
    input_ids, domain_ids = input_ids.to(device), domain_ids.to(device)
    valid = domain_ids != compiled.pad_id
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        valid &= attention_mask.bool()
    sources = []
    for s in sorted(set(domain_ids[valid].tolist())):
        if bool(_protected_mask(compiled, domain_ids, valid, s).any()):
            sources.append(s)
    if not sources:
        raise ModelError("no domain in these inputs is forbidden to another present domain; nothing to test",
                         code="DG531")
    causal = _causal(model) and hasattr(model, "generate")
    embed = model.get_input_embeddings()
    vocab = int(embed.num_embeddings)
    clean = _run(model, guarded, domain_ids, input_ids=input_ids, attention_mask=attention_mask)
    clean_gen = None
    if generate_tokens and causal:
        clean_gen = _generate(model, guarded, input_ids, domain_ids, attention_mask, generate_tokens)
    num_layers = len([k for k in clean if k.startswith("hidden_states")]) - 1
    g = torch.Generator().manual_seed(seed)
    by_poison = {p: {"trials": 0, "leaks": 0} for p in poisons}
    by_source = {compiled.domains[s]: {"trials": 0, "leaks": 0} for s in sources}
    leaks, examples = 0, []
    # Every (source, poison) pair once per round, in a seeded order.
    pairs = [(s, p) for s in sources for p in poisons]
    order = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist()]
    trials = rounds * len(pairs) if trials is None else trials
    gen = compiled.generation_id
    gen_forbidden = set() if gen is None else set(forbidden_sources(compiled)[gen])
    for t in range(trials):
        source, poison = order[t % len(order)]
        where = (domain_ids == source) & valid
        protected = _protected_mask(compiled, domain_ids, valid, source)
        ids, embeds, handle = input_ids, None, None
        if poison == "tokens":
            noise = torch.randint(0, vocab, input_ids.shape, generator=g).to(device)
            ids = torch.where(where, noise, input_ids)
        elif poison in ("nan", "inf", "-inf"):
            with torch.no_grad():
                embeds = embed(input_ids).masked_fill(where[:, :, None], _FILL[poison])
        else:
            layer = int(torch.randint(0, max(num_layers, 1), (1,), generator=g))
            handle = _hooked(model, layer, where, _FILL[poison])
        try:
            got = _run(model, guarded, domain_ids, input_ids=ids, inputs_embeds=embeds, attention_mask=attention_mask)
            changed = [k for k, v in got.items() if not bitwise_equal(v[protected], clean[k][protected])]
            if clean_gen is not None and poison == "tokens" and source in gen_forbidden:
                # Generated tokens are of the generation domain, which may not read ``source``.
                gen = _generate(model, guarded, ids, domain_ids, attention_mask, generate_tokens)
                changed += [k for k, v in gen.items() if not bitwise_equal(v, clean_gen[k])]
        finally:
            if handle is not None:
                handle.remove()
        leaked = bool(changed)
        leaks += leaked
        by_poison[poison]["trials"] += 1
        by_poison[poison]["leaks"] += leaked
        by_source[compiled.domains[source]]["trials"] += 1
        by_source[compiled.domains[source]]["leaks"] += leaked
        if leaked and len(examples) < 3:
            examples.append({"trial": t, "source": compiled.domains[source], "poison": poison,
                             "changed": changed[:4]})
    outputs = ("logits", "hidden_states") + (("generate",) if clean_gen is not None else ())
    return LeakReport(
        model=type(model).__name__,
        guarded=guarded,
        trials=trials,
        leaks=leaks,
        by_poison=by_poison,
        by_source=by_source,
        outputs=outputs,
        seed=seed,
        seconds=time.perf_counter() - start,
        examples=tuple(examples),
    )


def compare_dense(model: nn.Module, input_ids, domain_ids, **kwargs) -> tuple[LeakReport, LeakReport]:
    """Leak-test a guarded ``model`` and a dense copy of it (same weights) on the same trials."""
    from .guard import guard_state, unguard

    state = guard_state(model)
    guarded = leak_test(model, state.compiled, input_ids, domain_ids, **kwargs)
    dense = unguard(copy.deepcopy(model))
    try:
        baseline = leak_test(dense, state.compiled, input_ids, domain_ids, **kwargs)
    finally:
        del dense
    return guarded, baseline


# --- the position channel ---------------------------------------------------------------------
def position_channel(model: nn.Module, compiled, *, lengths: tuple[int, int] = (1, 5), protected_tokens: int = 4,
                     context_tokens: int = 3, seed: int = 0) -> dict:
    """Does a protected token's output depend on the *length* of a forbidden segment before it?

    Runs ``[A × a] [pad × (K-k)] [S × k] [R × m]`` for two lengths k of a segment of a
    domain S that R may not read, where A is a domain R may read (so relative positions
    matter too, as with rotary embeddings), and compares R's logits and hidden states
    bitwise. The padding keeps every token of A and R in the same column, so only the
    length of S differs. Under ``positions: global`` R's position ids shift with k; under
    ``per_domain`` and ``reach`` they do not. Returns {"positions", "source", "protected", "context",
    "lengths", "changed", "outputs_changed"}.
    """
    if not is_guarded(model):
        raise ModelError("position_channel needs a guarded model", code="DG508")
    forbidden = forbidden_sources(compiled)
    pairs = [(r, s) for r, srcs in forbidden.items() for s in srcs if r != s]
    if not pairs:
        raise ModelError("every domain may read every other; there is no forbidden segment to vary", code="DG531")
    gen = compiled.generation_id
    # Prefer the generation domain as the protected one: its position is what decoding sees.
    r, s = next(((r, s) for r, s in pairs if r == gen), pairs[0])
    readable = [a for a in range(compiled.num_domains) if a not in forbidden[r] and a != r]
    context = readable[0] if readable else None
    a = context_tokens if context is not None else 0
    short, long = lengths
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    ctx_ids = torch.randint(0, vocab, (a,), generator=g)
    src_ids = torch.randint(0, vocab, (long,), generator=g)
    prot_ids = torch.randint(0, vocab, (protected_tokens,), generator=g)
    outs = []
    for k in (short, long):
        dom = [context] * a + [compiled.pad_id] * (long - k) + [s] * k + [r] * protected_tokens
        ids = torch.cat([ctx_ids, torch.zeros(long - k, dtype=torch.long), src_ids[:k], prot_ids])
        outs.append(_run(model, True, torch.tensor([dom], device=device), input_ids=ids[None].to(device)))
    cols = slice(long + a, long + a + protected_tokens)
    changed = [k for k in outs[0] if not bitwise_equal(outs[0][k][:, cols], outs[1][k][:, cols])]
    return {
        "positions": compiled.positions,
        "source": compiled.domains[s],
        "protected": compiled.domains[r],
        "context": None if context is None else compiled.domains[context],
        "lengths": [short, long],
        "changed": bool(changed),
        "outputs_changed": changed[:4],
    }
