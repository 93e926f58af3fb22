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
from moelens.interventions import Intervention, disable, intervene, reweight
from moelens.interventions.contrast import generate_contrast


def _specs(model) -> dict[str, Intervention]:
    """The same disable + reweight on every token, and scoped to prompt / generated tokens (which
    routes each token under the controls of its group)."""
    layers = [layer.index for layer in moe_layers(model)]
    return {
        "all tokens": disable({layers[0]: [0, 1]}) + reweight({layers[-1]: [2]}, 4.0),
        "token-scoped": disable({layers[0]: [0, 1]}, tokens="generated") + reweight({layers[-1]: [2]}, 4.0, tokens="prompt"),
    }


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
    spec, on all tokens and token-scoped (interleaved runs, ``repeats`` each), and the cost of entering and
    leaving the block."""
    pad = model.config.pad_token_id or 0

    def forward():
        with torch.no_grad():
            model(**batch)

    def generate():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    for scope, spec in _specs(model).items():
        def enter_and_leave(spec=spec):
            with intervene(model, spec):
                pass

        forward_plain, forward_steered = _interleaved(forward, spec, model, repeats)
        generate_plain, generate_steered = _interleaved(generate, spec, model, repeats)
        setup = side_by_side({"bind": enter_and_leave}, repeats)["bind"]
        print(
            f"{name:<34} {scope:<13} forward {forward_plain * 1e3:8.1f} ms  steered {forward_steered / forward_plain:.3f}x   "
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


def measure_scoped_routing(model, repeats: int, batch: int = 8, tokens: int = 512) -> None:
    """Print the time to reroute one layer's logits ([batch x tokens, E]) under token-scoped specs
    relative to the same spec on all tokens (one prefill step; medians, alternating)."""
    from moelens.hooks.steps import StepTokens
    from moelens.interventions import top_k
    from moelens.interventions.apply import bind, reroute

    layer = moe_layers(model)[0]
    logits = torch.randn(batch * tokens, layer.num_experts, generator=torch.Generator().manual_seed(0))
    step = StepTokens(None, torch.arange(tokens).expand(batch, tokens), torch.ones(batch, tokens, dtype=torch.bool), 0)
    disabled = {layer.index: [0, 1]}
    specs = {
        "all tokens": disable(disabled),
        "prompt scope": disable(disabled, tokens="prompt"),
        "prompt + top_k(1) on generated": disable(disabled, tokens="prompt") + top_k(1, tokens="generated"),
        "every second position": disable(disabled, tokens=list(range(0, tokens, 2))),
    }
    plans = {name: next(p for p in bind(model, spec) if p.layer.index == layer.index) for name, spec in specs.items()}
    times = side_by_side({name: lambda plan=plan: reroute(plan, logits, step) for name, plan in plans.items()}, repeats * 6)
    base = times["all tokens"]
    print(f"rerouting one layer, {batch * tokens} tokens x {layer.num_experts} experts: all tokens {base * 1e3:.2f} ms; "
          + ", ".join(f"{name} {t / base:.2f}x" for name, t in times.items() if name != "all tokens"))


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
    measure_scoped_routing(model, args.repeats)
    large = qwen3_moe_large()
    size = (2, 64) if args.quick else (8, 256)
    measure(f"qwen3-moe-large {size[0]}x{size[1]}", large, random_batch(4096, *size), args.repeats, new_tokens=8)


if __name__ == "__main__":
    main()
