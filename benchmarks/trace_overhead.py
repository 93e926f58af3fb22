"""Cost of tracing: traced / bare forward, measured side by side in one run.

Traced = the whole ``with moelens.trace(model): model(**batch)`` block, including moving the
routing data to the host and building the tables at the block's end. For comparison, the same
capture with nnsight (``.save()`` of every router's output). Target: at most 1.03x on the large
model.

    python -m benchmarks.trace_overhead [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import warnings

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch, side_by_side
from moelens.hooks.adapters import module_name, moe_layers
from moelens.zoo.tiny import TINY_FAMILIES


def _nnsight_capture(model, tokenizer):
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
        with torch.no_grad(), wrapper.trace(batch):
            saved = nnsight.save([envoy(path).output for path in paths])
        return saved

    return run


def measure(name: str, model, batch, repeats: int, tokenizer=None) -> None:
    def bare():
        with torch.no_grad():
            model(**batch)

    def traced():
        with torch.no_grad(), moelens.trace(model) as tracer:
            model(**batch)
        return tracer

    variants = {"bare": bare, "moelens": traced}
    if tokenizer is not None:
        capture = _nnsight_capture(model, tokenizer)
        variants["nnsight"] = lambda: capture(dict(batch))
    times = side_by_side(variants, repeats)
    events = traced().arrow("routes").num_rows
    row = f"{name:<28} bare {times['bare'] * 1e3:9.1f} ms   moelens {times['moelens'] / times['bare']:.3f}x"
    if "nnsight" in times:
        row += f"   nnsight {times['nnsight'] / times['bare']:.3f}x"
    print(row + f"   ({events:,} routing events per forward)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller large-model batch (for a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("ratio = median time of the variant / median time of the bare forward, interleaved runs")
    large = qwen3_moe_large()
    batch_size, length = (2, 64) if args.quick else (8, 256)
    tokenizer = moelens.load("tiny:qwen3_moe")[1]
    measure(f"qwen3-moe-large {batch_size}x{length}", large, random_batch(4096, batch_size, length), args.repeats, tokenizer)
    for family in TINY_FAMILIES:
        model, tokenizer = moelens.load(f"tiny:{family}")
        measure(f"tiny:{family} 8x128", model, random_batch(model.config.vocab_size - 3, 8, 128), args.repeats)


if __name__ == "__main__":
    main()
