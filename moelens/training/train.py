"""Train ``moelens-tiny``: a byte-level BPE tokenizer and a small ``Qwen3MoeForCausalLM``.

The recipe (issue 5): 4 layers, hidden 128, 16 experts of width 256, top-2; every batch holds the
same number of windows from every domain, each window starting with the BOS token (attention sinks
form on it); cross-entropy plus the Switch load-balancing loss computed *per layer* and summed
(coefficient 0.01 per layer; transformers' built-in loss pools all layers' router logits, which
lets a few hub experts take most language tokens); AdamW 2e-3 with warm-up and cosine decay; a
fixed token budget, seeded. On 2 CPU cores ~6M tokens take ~20 minutes.

Throughput: glibc's allocator returns and re-maps large blocks on every step unless
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` are set high, which
costs 13-37% of CPU training speed; ``OMP_WAIT_POLICY=PASSIVE`` keeps OpenMP threads from spinning
on a shared machine. These are read only at process start: ``main()`` re-executes itself with them
(see :data:`MALLOC_ENV`); callers of :func:`train_tiny` set them in the launching shell. The log
records whether they were in effect.

Output folder: an ordinary Hugging Face checkpoint (``config.json``, ``model.safetensors`` in
bfloat16 to stay under 25 MB, tokenizer files) plus ``training_log.json`` (settings, token counts,
loss curve).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moelens.training.corpus import DOMAINS, read_split

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's maximum; larger values are ignored
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
    # not malloc, but also read only at start-up: OpenMP threads that spin while waiting for a
    # descheduled peer waste most of a shared 2-core machine
    "OMP_WAIT_POLICY": "PASSIVE",
}
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"  # ids 0, 1, 2
VOCAB_SIZE = 4096
MODEL_SHAPE = {  # Qwen3MoeConfig fields of moelens-tiny; the card quotes these numbers
    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "num_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
    "intermediate_size": 512, "max_position_embeddings": 512,
}


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """The knobs of :func:`train_tiny`; the defaults are the recipe of the shipped ``moelens-tiny``.

    token_budget: training tokens (BOS included); a step sees ``len(DOMAINS) * windows_per_domain * seq_len``.
    seed: torch and numpy seed (weights, window sampling).
    seq_len: tokens per training window (and per held-out evaluation window).
    windows_per_domain: windows of every domain in each step's batch.
    lr: AdamW peak learning rate (linear warm-up, cosine decay to 10%).
    lb_coef: weight of the Switch load-balancing loss of each layer (summed over layers).
    eval_every: steps between held-out evaluations (and the last step).
    experts_implementation: transformers experts implementation used for training.
    """

    token_budget: int = 6_000_000
    seed: int = 0
    seq_len: int = 256
    windows_per_domain: int = 2
    lr: float = 2e-3
    lb_coef: float = 0.01
    eval_every: int = 100
    experts_implementation: str = "grouped_mm"


def train_tiny(corpus_dir: Path, out_dir: Path, *, options: TrainingOptions = TrainingOptions()) -> dict:
    """Train tokenizer and model on the corpus built by :func:`moelens.training.corpus.build_corpus`.

    Runs as ``options`` say (:class:`TrainingOptions`). Writes the checkpoint (bfloat16) and
    ``training_log.json`` into ``out_dir`` and returns the log's content.
    """
    import numpy as np
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    token_budget, seed, seq_len, lr = options.token_budget, options.seed, options.seq_len, options.lr
    windows_per_domain, lb_coef, eval_every = options.windows_per_domain, options.lb_coef, options.eval_every
    experts_implementation = options.experts_implementation

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tokenizer = train_tokenizer(corpus_dir, out_dir)
    streams = {d: _token_stream(tokenizer, read_split(corpus_dir, "train", d)) for d in DOMAINS}
    heldout = {d: heldout_windows(tokenizer, corpus_dir, d, n_windows=8, seq_len=seq_len) for d in DOMAINS}
    print(f"[train] tokenizer + data ready in {time.time() - started:.0f}s; train tokens per domain "
          f"{ {d: len(s) for d, s in streams.items()} }", file=sys.stderr)

    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, **MODEL_SHAPE, norm_topk_prob=True, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, router_aux_loss_coef=lb_coef,
        output_router_logits=False, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(experts_implementation)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens_per_step = len(DOMAINS) * windows_per_domain * seq_len
    n_steps = max(1, token_budget // tokens_per_step)
    warmup = min(100, n_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, n_steps))
    rng = np.random.default_rng(seed)

    curve: list[dict] = []
    t0 = time.time()
    for step in range(n_steps):
        batch = torch.from_numpy(np.stack([
            _random_window(streams[d], seq_len, rng) for d in DOMAINS for _ in range(windows_per_domain)]))
        out = model(input_ids=batch, output_router_logits=True)
        ce = _causal_lm_loss(out.logits, batch)
        lb = per_layer_load_balancing_loss(out.router_logits, config.num_experts, config.num_experts_per_tok)
        loss = ce + lb_coef * lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % eval_every == 0 or step == n_steps - 1:
            point = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "train_ce": round(ce.item(), 4),
                     "lb_per_layer": round(lb.item() / config.num_hidden_layers, 4),
                     "heldout_ce": {d: round(v, 4) for d, v in evaluate(model, heldout).items()},
                     "elapsed_s": round(time.time() - t0, 1)}
            curve.append(point)
            rate = point["tokens"] / max(point["elapsed_s"], 1e-9)
            print(f"[train] step {step + 1}/{n_steps} ce {point['train_ce']:.3f} lb {point['lb_per_layer']:.3f} "
                  f"heldout {point['heldout_ce']} ({rate:.0f} tok/s)", file=sys.stderr, flush=True)

    model.eval()
    # bfloat16 keeps the checkpoint under 25 MB (float32 would be ~28 MB); analyses upcast on load.
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log = {
        "seed": seed, "token_budget": token_budget, "tokens_trained": n_steps * tokens_per_step,
        "steps": n_steps, "seq_len": seq_len, "windows_per_domain": windows_per_domain,
        "tokens_per_step": tokens_per_step, "lr": lr, "warmup_steps": warmup, "schedule": "linear warm-up, cosine to 10%",
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1), grad clip 1.0",
        "lb_loss": f"Switch load-balancing loss per layer, summed over layers, coefficient {lb_coef}",
        "experts_implementation": experts_implementation, "parameters": n_params,
        "train_tokens_per_domain": {d: int(len(s)) for d, s in streams.items()},
        "malloc_env_in_effect": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
        "torch_threads": torch.get_num_threads(), "train_seconds": round(time.time() - t0, 1),
        "total_seconds": round(time.time() - started, 1), "curve": curve,
    }
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def train_tokenizer(corpus_dir: Path, out_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """Byte-level BPE with :data:`VOCAB_SIZE` tokens trained on the corpus' training split.

    Digits are split one by one (arithmetic stays learnable), and the post-processor prepends BOS,
    so ``tokenizer(text)`` starts with it, as every training window does. Saved to ``out_dir``
    when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for d in DOMAINS for t in read_split(corpus_dir, "train", d)), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def per_layer_load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Sum over layers of the Switch loss ``E * sum_e f_e * P_e`` computed within each layer.

    ``f_e`` is the fraction of top-k slots that go to expert ``e`` and ``P_e`` its mean router
    probability, both over this layer's tokens only: each layer must balance its own experts,
    which the pooled loss does not demand. Equals ``top_k`` per layer when perfectly balanced.
    """
    import torch

    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        fraction = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / probs.shape[0]
        total = total + num_experts * torch.sum(fraction * probs.mean(dim=0))
    return total


def heldout_windows(tokenizer: PreTrainedTokenizerBase, corpus_dir: Path, domain: str, *,
                    n_windows: int, seq_len: int = 256) -> list[list[int]]:
    """Up to ``n_windows`` BOS-led windows (token-id lists of ``seq_len`` ids) spread evenly over the domain's
    held-out stream."""
    stream = _token_stream(tokenizer, read_split(corpus_dir, "heldout", domain))
    n_full = max(1, len(stream) // (seq_len - 1))
    starts = sorted({int(i * n_full / n_windows) * (seq_len - 1) for i in range(n_windows)})
    return [[tokenizer.bos_token_id, *map(int, stream[s:s + seq_len - 1])] for s in starts]


def evaluate(model, windows: dict[str, list[list[int]]]) -> dict[str, float]:
    """Mean next-token cross-entropy per domain, in nats per token over every position of the windows
    (windows of a domain must share one length)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = {d: _causal_lm_loss(model(input_ids=torch.tensor(w)).logits, torch.tensor(w)).item()
                  for d, w in windows.items()}
    model.train(was_training)
    return losses


def _causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def _token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str]):
    """All documents tokenized without BOS and joined with EOS, as one int32 array."""
    import numpy as np

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int32)


def _random_window(stream, seq_len: int, rng) -> list[int]:
    import numpy as np

    start = int(rng.integers(0, len(stream) - seq_len))
    return np.concatenate([[0], stream[start:start + seq_len - 1]]).astype(np.int64)  # 0 = BOS


def _lr_factor(step: int, warmup: int, n_steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def main(argv: list[str] | None = None) -> int:
    """Command line: train moelens-tiny (re-executes itself once with the allocator variables); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moelens.training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder written by moelens.training.corpus")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--tokens", type=int, default=6_000_000, help="training token budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lb-coef", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and not os.environ.get("MOELENS_NO_REEXEC"):
        # glibc reads MALLOC_* only at start-up: start again with them set (once).
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "moelens.training.train", *argv],
                  {**os.environ, **MALLOC_ENV, "MOELENS_NO_REEXEC": "1"})
    options = TrainingOptions(token_budget=args.tokens, seed=args.seed, lb_coef=args.lb_coef, eval_every=args.eval_every)
    log = train_tiny(args.corpus, args.out, options=options)
    print(f"trained {log['tokens_trained']} tokens in {log['train_seconds']}s; "
          f"final held-out CE {log['curve'][-1]['heldout_ce']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
