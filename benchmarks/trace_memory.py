"""Memory of tracing a long generation, against trace length, measured side by side in one run.

For each generation length, the same greedy ``generate`` runs traced under two settings:
``max_device_bytes=None`` (every recorded step stays on the model's device until the block ends)
and a budget (old steps move to pinned host memory during the block). Printed per row:

* routing events recorded (tokens x MoE layers x k);
* bytes the tracer held on the device at its peak, under each setting (the tracer's own count of
  its condensed tensors; on CUDA also ``torch.cuda.max_memory_allocated`` above the untraced
  generation's peak);
* host bytes of the condensed steps per routing event (flat = linear growth in events);
* what the uncondensed router logits would have held (``layers x tokens x E x 4`` bytes): the
  tracer keeps only indices, weights and rank keys unless ``full_logits`` is asked for.

Target: device bytes flat past the budget as the generation grows, host bytes linear in events.
On a CPU-only machine the model's device *is* the host: there the device columns show the
tracer's bookkeeping with every recorded tensor treated as device-held (what it would keep on a
GPU), clearly labelled; run it on a GPU for measured device memory.

    python -m benchmarks.trace_memory [--lengths 32,128,512] [--budget-mib 1]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch


@contextmanager
def _simulated_accelerator():
    """Count the CPU model's recorded tensors as device-held and their moves as copies to the host,
    so that the budget logic runs on a machine without a GPU. It shows the tracer's bookkeeping
    (what it would hold on a device), not a measurement of GPU memory."""
    import moelens.tracer as tracer_module

    saved = tracer_module._on_accelerator, tracer_module._to_host
    tracer_module._on_accelerator, tracer_module._to_host = (lambda tensor: True), (lambda tensor: tensor.clone())
    try:
        yield
    finally:
        tracer_module._on_accelerator, tracer_module._to_host = saved


def _run(model, batch, new_tokens: int, budget: int | None) -> tuple[moelens.Tracer, int]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), moelens.trace(model, max_device_bytes=budget, end_token_ids=()) as tracer:
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return tracer, torch.cuda.max_memory_allocated() if cuda else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,128,512", help="generated tokens per row, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget-mib", type=float, default=0.25)
    args = parser.parse_args(argv)
    model = qwen3_moe_large()
    config = model.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batch = {k: v.to(device) for k, v in random_batch(config.vocab_size, args.batch, 16).items()}
    budget = int(args.budget_mib * 2**20)
    layers, experts, k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    print(f"qwen3-moe-large {layers} layers x {experts} experts, top-{k}, batch {args.batch}, budget {args.budget_mib} MiB, device {device}")
    simulated = device == "cpu"
    if simulated:
        print("no GPU: device columns are the tracer's own count with every recorded tensor treated as device-held "
              "(bookkeeping, not measured GPU memory)")
    print(f"{'new tokens':>10} {'events':>10} {'device peak, unbounded':>24} {'device peak, budget':>20} "
          f"{'host B/event':>13} {'raw logits would hold':>22}")
    for length in (int(n) for n in args.lengths.split(",")):
        with _simulated_accelerator() if simulated else nullcontext():
            unbounded, cuda_unbounded = _run(model, batch, length, None)
            bounded, cuda_bounded = _run(model, batch, length, budget)
        events = len(bounded.routes)
        host = sum(t.numel() * t.element_size() for step in bounded._steps for t in step.tensors.values())
        tokens = len(bounded.tokens)
        cuda_note = f" (cuda {cuda_unbounded / 2**20:.1f} / {cuda_bounded / 2**20:.1f} MiB)" if device == "cuda" else ""
        print(
            f"{length:>10} {events:>10,} {unbounded.peak_device_bytes / 2**20:>20.2f} MiB {bounded.peak_device_bytes / 2**20:>16.2f} MiB "
            f"{host / events:>13.1f} {layers * tokens * experts * 4 / 2**20:>18.2f} MiB{cuda_note}"
        )


if __name__ == "__main__":
    main()
