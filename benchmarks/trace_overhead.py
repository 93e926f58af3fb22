"""Cost of tracing: traced / bare, measured side by side in one run.

``moelens`` = the whole ``with moelens.trace(model): ...`` block: hooks, condensing every step on
the device, moving it to the host and the NaN check at the block's end. The Arrow tables are built
on first access, so ``+tables`` adds reading them once (``tracer.tables()``). For comparison, the
same capture with nnsight (``.save()`` of every router's output, at every step of a generate).

Cases: the notebook scale (the shipped ``moelens-tiny`` on a few short prompts, one forward and a
short greedy generate; targets: at most 1.10x a bare forward and below nnsight), the large random
model (target: at most 1.03x), and every tiny family.

    python -m benchmarks.trace_overhead [--repeats N] [--quick] [--notebook]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch, side_by_side
from moelens.hooks.adapters import module_name, moe_layers
from moelens.zoo.tiny import TINY_FAMILIES

NOTEBOOK_PROMPTS = ["def add(a, b):", "The river flows past the old mill", "12 + 30 =", "Die Datei wird"]


def _nnsight_capture(model, tokenizer, new_tokens: int) -> Callable[[dict[str, torch.Tensor]], object]:
    """nnsight saving every router's output: of one forward, or of every step of a greedy generate."""
    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = nnsight.LanguageModel(model, tokenizer=tokenizer)
    paths = [module_name(model, layer.router) for layer in moe_layers(model)]

    def envoy(path):
        node = wrapper
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def run(batch):
        if not new_tokens:
            with torch.no_grad(), wrapper.trace(batch):
                saved = nnsight.save([envoy(path).output for path in paths])
            return saved
        with torch.no_grad(), wrapper.generate(batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id) as tracer:
            saved = nnsight.save(list())
            for _ in tracer.iter[0:new_tokens]:  # the prefill and every decode step
                saved.append([envoy(path).output for path in paths])
        return saved

    return run


def measure(name: str, model, batch, repeats: int, tokenizer=None, new_tokens: int = 0) -> None:
    """Print the variants' median times over the bare run's: one forward of ``batch``, or with
    ``new_tokens`` a greedy ``generate`` of that many tokens. nnsight runs when ``tokenizer`` is given."""
    pad = dict(pad_token_id=tokenizer.pad_token_id) if tokenizer is not None else {}

    def call():
        if new_tokens:
            model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, **pad)
        else:
            model(**batch)

    def bare():
        with torch.no_grad():
            call()

    def traced():
        with torch.no_grad(), moelens.trace(model) as tracer:
            call()
        return tracer

    variants = {"bare": bare, "moelens": traced, "moelens+tables": lambda: traced().tables()}
    if tokenizer is not None:
        capture = _nnsight_capture(model, tokenizer, new_tokens)
        variants["nnsight"] = lambda: capture(dict(batch))
    times = side_by_side(variants, repeats)
    events = traced().arrow("routes").num_rows
    row = (
        f"{name:<34} bare {times['bare'] * 1e3:8.1f} ms   moelens {times['moelens'] / times['bare']:.3f}x"
        f"   +tables {times['moelens+tables'] / times['bare']:.3f}x"
    )
    if "nnsight" in times:
        row += f"   nnsight {times['nnsight'] / times['bare']:.3f}x"
    print(row + f"   ({events:,} routing events)", flush=True)


def notebook_scale(repeats: int) -> None:
    """The shipped model on a few short prompts, as a notebook traces it: a forward and a generate."""
    model, tokenizer = moelens.load("moelens-tiny")
    batch = tokenizer(NOTEBOOK_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    shape = "x".join(map(str, batch["input_ids"].shape))
    measure(f"moelens-tiny forward {shape}", model, batch, repeats, tokenizer)
    measure(f"moelens-tiny generate {shape} +8", model, batch, max(repeats // 4, 5), tokenizer, new_tokens=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="rounds per case (the notebook-scale forward runs 20x as many: it takes milliseconds)")
    parser.add_argument("--quick", action="store_true", help="smaller large-model batch (for a smoke run)")
    parser.add_argument("--notebook", action="store_true", help="only the notebook-scale case")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("ratio = median time of the variant / median time of the bare run, interleaved runs")
    notebook_scale(args.repeats * 20)
    if args.notebook:
        return
    large = qwen3_moe_large()
    batch_size, length = (2, 64) if args.quick else (8, 256)
    tokenizer = moelens.load("tiny:qwen3_moe")[1]
    measure(f"qwen3-moe-large {batch_size}x{length}", large, random_batch(4096, batch_size, length), args.repeats, tokenizer)
    for family in TINY_FAMILIES:
        model, tokenizer = moelens.load(f"tiny:{family}")
        measure(f"tiny:{family} 8x128", model, random_batch(model.config.vocab_size - 3, 8, 128), args.repeats)


if __name__ == "__main__":
    main()
