"""Cost of steering, measured side by side in one run.

* forward and generate() with an active intervention vs the untouched model (target <= 1.05x),
  on the shipped model and on the larger random Qwen3-MoE;
* SCMoE self-contrast decoding per generated token vs greedy decoding (the paper: 1.30x with two
  separate passes on GPU).

    python -m benchmarks.intervention_overhead [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch, side_by_side
from moelens.hooks.adapters import moe_layers
from moelens.interventions import disable, intervene, reweight
from moelens.interventions.contrast import generate_contrast


def _spec(model):
    layers = [layer.index for layer in moe_layers(model)]
    return disable({layers[0]: [0, 1]}) + reweight({layers[-1]: [2]}, 4.0)


def measure(name: str, model, batch, repeats: int, new_tokens: int) -> None:
    spec = _spec(model)
    pad = model.config.pad_token_id or 0

    def forward():
        with torch.no_grad():
            model(**batch)

    def forward_steered():
        with torch.no_grad(), intervene(model, spec):
            model(**batch)

    def generate():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    def generate_steered():
        with torch.no_grad(), intervene(model, spec):
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    times = side_by_side({"forward": forward, "forward+spec": forward_steered, "generate": generate, "generate+spec": generate_steered}, repeats)
    print(
        f"{name:<34} forward {times['forward'] * 1e3:8.1f} ms  steered {times['forward+spec'] / times['forward']:.3f}x   "
        f"generate({new_tokens}) {times['generate'] * 1e3:8.1f} ms  steered {times['generate+spec'] / times['generate']:.3f}x",
        flush=True,
    )


def measure_contrast(model, tokenizer, prompts, repeats: int, new_tokens: int) -> None:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")

    def greedy():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def contrast():
        generate_contrast(model, tokenizer, prompts, max_new_tokens=new_tokens)

    times = side_by_side({"greedy": greedy, "scmoe": contrast}, repeats)
    print(f"SCMoE vs greedy, {len(prompts)} prompts x {new_tokens} tokens: {times['scmoe'] / times['greedy']:.2f}x per generated token "
          f"(greedy {times['greedy'] / new_tokens * 1e3:.1f} ms/token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("ratio = median time with the intervention / median time without, interleaved runs")
    model, tokenizer = moelens.load("moelens-tiny")
    prompts = ["def parse(line):\n    return", "La commande affiche", "1234 + 567 =", "The manual page describes"] * 2
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    measure("moelens-tiny 8 prompts", model, batch, args.repeats, new_tokens=16)
    measure_contrast(model, tokenizer, prompts, args.repeats, new_tokens=16)
    large = qwen3_moe_large()
    size = (2, 64) if args.quick else (8, 256)
    measure(f"qwen3-moe-large {size[0]}x{size[1]}", large, random_batch(4096, *size), args.repeats, new_tokens=8)


if __name__ == "__main__":
    main()
