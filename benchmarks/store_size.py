"""Bytes on disk per routing event: the Parquet trace store vs torch.save of the same data.

One routing event = one (token, layer, expert slot) row of ``routes``. Target: at most 2.5 bytes
per event. Compared side by side in one run with ``torch.save`` of the router logits for the same
tokens (what a hand-rolled hook usually dumps) and of the (indices, weights) tensors.

    python -m benchmarks.store_size [--batches N]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch

import moelens
from benchmarks.common import qwen3_moe_large, random_batch
from moelens import store


def _torch_save_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches of 8 x 256 tokens")
    args = parser.parse_args()
    model = qwen3_moe_large()
    with tempfile.TemporaryDirectory() as root:
        logits_bytes = pair_bytes = events = 0
        for index in range(args.batches):
            batch = random_batch(model.config.vocab_size, 8, 256, seed=index)
            captured = []
            handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: captured.append(out)) for layer in model.model.layers]
            try:
                with torch.no_grad(), moelens.trace(model, prompt_ids=range(index * 8, index * 8 + 8)) as tracer:
                    model(**batch)
            finally:
                for handle in handles:
                    handle.remove()
            tables = tracer.tables()
            store.write_shard(Path(root), index, {"routes": tables["routes"]})
            events += tables["routes"].num_rows
            logits_bytes += _torch_save_bytes(torch.stack([out[0] for out in captured]))
            pair_bytes += _torch_save_bytes((torch.stack([out[2] for out in captured]), torch.stack([out[1] for out in captured])))
        parquet_bytes = sum(p.stat().st_size for p in (Path(root) / "routes").glob("*.parquet"))
    print(f"{events:,} routing events (Qwen3-MoE shape: 8 layers, 64 experts, top-8; {args.batches} x 8 x 256 tokens)")
    print(f"  moelens Parquet routes         {parquet_bytes / events:6.2f} bytes/event   (target <= 2.5)")
    print(f"  torch.save router logits fp32  {logits_bytes / events:6.2f} bytes/event   ({logits_bytes / parquet_bytes:.0f}x larger)")
    print(f"  torch.save indices + weights   {pair_bytes / events:6.2f} bytes/event   ({pair_bytes / parquet_bytes:.1f}x larger)")


if __name__ == "__main__":
    main()
