"""Guarded generation against the same model unguarded: milliseconds per generated token.

    python benchmarks/generate.py [--prompts 256,2048] [--new 33] [--rounds 4] [--policy policies/clinical.yaml]
                                  [--json out.json]

The model is a randomly initialised Llama of SmolLM2-135M's shape (30 layers, 9 query and 3
key/value heads of 64, hidden 576; bf16; nothing is downloaded), loaded once and guarded as a
deep copy, so both run the same weights (transformers' SDPA attention unguarded). Each prompt is
split into six equal segments: up to five of the policy's other domains in id order, then its
generation domain. ``generate()`` runs greedy with the KV cache; the time per token is
(time of ``new`` tokens − time of 1 token) ÷ (new − 1), each the median of three calls. Dense and
guarded take turns for ``rounds`` rounds, and the table shows the fastest and the median round of
each: on a machine whose host time varies between calls, the fastest round is the steadier measure
of what the code costs. Needs a CUDA GPU and transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import domainguard as dg

REPO = Path(__file__).resolve().parent.parent


def smollm2_shaped(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=16384, rope_theta=100000.0,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()


def segment_ids(compiled, n: int, device) -> torch.Tensor:
    """Six equal segments over the policy's domains, ending in the generation domain."""
    gen = compiled.generation_id
    others = [i for i in range(compiled.num_domains) if i != gen][:5]
    order = others + [gen]
    ids = torch.empty(1, n, dtype=torch.long)
    seg = n // len(order)
    for i, d in enumerate(order):
        ids[0, i * seg:(i + 1) * seg if i < len(order) - 1 else n] = d
    return ids.to(device)


def per_token_ms(model, prompt, new: int, **kw) -> float:
    def run(k):
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, **kw)

    def median_ms(k):
        run(k)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(k)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return (median_ms(new) - median_ms(1)) / (new - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="256,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--new", type=int, default=33, help="tokens generated per timed call")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--policy", type=Path, default=REPO / "policies" / "clinical.yaml")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    if args.new < 2:
        ap.error("--new must be at least 2")
    device = torch.device("cuda")
    dense = smollm2_shaped(device)
    compiled = dg.compile(dg.load_policy(args.policy), layers=dense.config.num_hidden_layers)
    if compiled.generation_id is None:
        ap.error(f"{args.policy} declares no generation domain")
    guarded = dg.guard(copy.deepcopy(dense), compiled)
    rows = []
    with torch.no_grad():
        for n in (int(x) for x in args.prompts.split(",")):
            prompt = torch.randint(0, dense.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            prompt = prompt.to(device)
            ids = segment_ids(compiled, n, device)
            times = {"dense": [], "guarded": []}
            for _ in range(args.rounds):
                times["dense"].append(per_token_ms(dense, prompt, args.new))
                times["guarded"].append(per_token_ms(guarded, prompt, args.new, domain_ids=ids))
            row = {"prompt": n, **{f"{k}_ms_{s}": round(f(v), 2) for k, v in times.items()
                                   for s, f in (("min", min), ("median", statistics.median))}}
            row["guarded_over_dense_min"] = round(row["guarded_ms_min"] / row["dense_ms_min"], 2)
            rows.append(row)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, policy {args.policy.name}, "
          f"{args.new} tokens per timed call, {args.rounds} rounds")
    print("| prompt | dense ms/token (fastest, median) | guarded ms/token (fastest, median) | guarded ÷ dense (fastest) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['dense_ms_min']}, {r['dense_ms_median']} | {r['guarded_ms_min']}, "
              f"{r['guarded_ms_median']} | {r['guarded_over_dense_min']} |")
    if args.json:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "policy": str(args.policy), "new": args.new, "rounds": args.rounds}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
