"""Cost of steering, measured side by side in one run.

* forward and generate() with an active intervention vs the untouched model (target <= 1.05x),
  on the shipped model and on the larger random Qwen3-MoE, alternating round by round; entering
  the ``with`` block (checking the spec against the model) is timed apart;
* SCMoE self-contrast decoding per generated token vs greedy decoding (the paper: 1.30x with two
  separate passes on GPU).

    python -m benchmarks.intervention_overhead [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch, side_by_side
from moelens.hooks.adapters import moe_layers
from moelens.interventions import disable, intervene, reweight
from moelens.interventions.contrast import generate_contrast


def _spec(model):
    layers = [layer.index for layer in moe_layers(model)]
    return disable({layers[0]: [0, 1]}) + reweight({layers[-1]: [2]}, 4.0)


def _interleaved(run, spec, model, repeats: int) -> tuple[float, float]:
    """Median seconds of ``run`` without and with ``spec`` active, alternating every round; the
    intervention is entered and left outside the timed region (its cost is reported apart)."""
    run()
    plain, steered = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        plain.append(time.perf_counter() - start)
        with intervene(model, spec):
            start = time.perf_counter()
            run()
            steered.append(time.perf_counter() - start)
    return statistics.median(plain), statistics.median(steered)


def measure(name: str, model, batch, repeats: int, new_tokens: int) -> None:
    """Print the median forward and generate(new_tokens) times of ``batch`` with and without a disable + reweight
    spec (interleaved runs, ``repeats`` each) and the cost of entering and leaving the block."""
    spec = _spec(model)
    pad = model.config.pad_token_id or 0

    def forward():
        with torch.no_grad():
            model(**batch)

    def generate():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    def enter_and_leave():
        with intervene(model, spec):
            pass

    forward_plain, forward_steered = _interleaved(forward, spec, model, repeats)
    generate_plain, generate_steered = _interleaved(generate, spec, model, repeats)
    setup = side_by_side({"bind": enter_and_leave}, repeats)["bind"]
    print(
        f"{name:<34} forward {forward_plain * 1e3:8.1f} ms  steered {forward_steered / forward_plain:.3f}x   "
        f"generate({new_tokens}) {generate_plain * 1e3:8.1f} ms  steered {generate_steered / generate_plain:.3f}x   "
        f"(entering + leaving the block: {setup * 1e3:.2f} ms)",
        flush=True,
    )


def measure_contrast(model, tokenizer, prompts, repeats: int, new_tokens: int) -> None:
    """Print SCMoE decoding's time per generated token relative to plain greedy generation of ``prompts``."""
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
    """Print the overhead of interventions and of SCMoE decoding on the benchmark model."""
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
