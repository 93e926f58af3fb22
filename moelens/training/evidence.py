"""Specialization evidence for a trained MoE such as ``moelens-tiny``.

On text of every domain (held-out corpus windows, or the project's ``data/probes/domains.jsonl``
when no corpus is at hand, as in CI) this measures:

- the routing distribution per domain and layer (share of top-k slots per expert);
- the normalised mutual information between expert choice and domain per layer,
  ``NMI = 2 I(D; E) / (H(D) + H(E))`` over top-k slots, every domain weighted equally;
- experts never chosen, per layer;
- ablation: per domain, the ``n_ablate`` experts per layer the domain over-uses most (its share
  minus the mean share of the other domains, measured on a *selection* half of the texts) are
  disabled by setting their router logits to -inf before top-k, so tokens re-route; the relative
  loss increase is measured on the other (*evaluation*) half of every domain, and compared with
  disabling ``n_ablate`` random experts per layer (``seeds`` draws);
- massive activations: max |hidden state| per layer and its ratio to the median |hidden state|;
- the attention mass that queries put on the first (BOS) token, per layer.

:func:`evidence` returns everything as a dict and writes ``evidence-<source>.json`` and
``evidence-<source>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moelens.analysis._profiling_experts import TokenBatch
from moelens.analysis.super_experts import SinkMass
from moelens.hooks.adapters import moe_view
from moelens.interventions import disable, intervene
from moelens.loading import shipped_path
from moelens.training.corpus import DOMAINS

if TYPE_CHECKING:
    import numpy as np
    import torch



@dataclass(frozen=True, kw_only=True)
class EvidenceOptions:
    """The knobs of :func:`evidence` (defaults: the numbers the model card quotes).

    n_windows: held-out corpus windows per domain (with a corpus only).
    seq_len: tokens per held-out window (with a corpus only).
    n_ablate: experts disabled per layer in each ablation (targeted and random).
    seeds: random-ablation draws.
    """

    n_windows: int = 24
    seq_len: int = 256
    n_ablate: int = 2
    seeds: int = 10


def evidence(
    model_dir: Path,
    corpus_dir: Path | None = None,
    *,
    out_dir: Path | None = None,
    probes: Path | None = None,
    options: EvidenceOptions = EvidenceOptions(),
) -> dict:
    """Measure the specialization evidence of the model in ``model_dir``.

    With ``corpus_dir``, texts are ``options.n_windows`` held-out windows of ``options.seq_len``
    tokens per domain; without it, the prompts of ``probes`` (default: the shipped
    ``domains.jsonl``). Either way the first half of each domain's texts selects experts and the
    second half measures losses; every real token counts (BOS included, padding not). Results are
    written to ``out_dir`` (default: ``model_dir``) as ``evidence-heldout.*`` or
    ``evidence-probes.*`` and returned as a dict (losses in nats per token).
    """
    n_windows, seq_len, n_ablate, seeds = options.n_windows, options.seq_len, options.n_ablate, options.seeds
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32 for the analysis (the checkpoint is stored in bfloat16); eager attention so that
    # attention weights can be returned for the sink measurement.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    probes = probes if probes is not None else shipped_path("probes", "domains.jsonl")
    texts, source = load_domain_texts(tokenizer, corpus_dir, probes, n_windows=n_windows, seq_len=seq_len)
    select = {d: seqs[: len(seqs) // 2] for d, seqs in texts.items()}
    held = {d: seqs[len(seqs) // 2:] for d, seqs in texts.items()}

    selection_counts = {d: routing_counts(model, seqs) for d, seqs in select.items()}  # [L, E] each
    counts = {d: selection_counts[d] + routing_counts(model, seqs) for d, seqs in held.items()}
    share = {d: c / c.sum(axis=1, keepdims=True) for d, c in counts.items()}
    n_layers, n_experts = next(iter(counts.values())).shape
    total = sum(counts.values())

    base = {d: mean_loss(model, seqs) for d, seqs in held.items()}
    targeted = {}
    for domain in DOMAINS:
        chosen = overused_experts(selection_counts, domain, n_ablate)
        with intervene(model, disable(chosen)):
            losses = {d: mean_loss(model, seqs) for d, seqs in held.items()}
        targeted[domain] = {"experts": {str(l): e for l, e in chosen.items()}, **_relative(losses, base, domain)}
    random_runs = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        chosen = {l: sorted(rng.choice(n_experts, n_ablate, replace=False).tolist()) for l in range(n_layers)}
        with intervene(model, disable(chosen)):
            losses = {d: mean_loss(model, seqs) for d, seqs in held.items()}
        random_runs.append({d: (losses[d] - base[d]) / base[d] for d in DOMAINS})

    result = {
        "model_dir": str(model_dir), "source": source, "n_ablate_per_layer": n_ablate, "random_seeds": seeds,
        "tokens_per_domain": {d: int(sum(len(s) for s in seqs)) for d, seqs in texts.items()},
        "heldout_loss": {d: round(v, 4) for d, v in base.items()},
        "nmi_per_layer": [round(nmi(np.stack([counts[d][l] for d in DOMAINS])), 4) for l in range(n_layers)],
        "unused_experts_per_layer": [np.flatnonzero(total[l] == 0).tolist() for l in range(n_layers)],
        "routing_share": {d: np.round(s, 4).tolist() for d, s in share.items()},
        "ablation": _ablation_table(targeted, random_runs),
        **activation_stats(model, [texts[d][0] for d in DOMAINS]),
    }
    out_dir = model_dir if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"evidence-{'heldout' if corpus_dir is not None else 'probes'}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(result))
    return result


def load_domain_texts(tokenizer, corpus_dir: Path | None, probes: Path, *, n_windows: int,
                      seq_len: int) -> tuple[dict[str, list[list[int]]], str]:
    """Token ids (BOS first) per domain, and a description of where they came from."""
    if corpus_dir is not None:
        from moelens.training.train import heldout_windows

        texts = {d: heldout_windows(tokenizer, corpus_dir, d, n_windows=n_windows, seq_len=seq_len) for d in DOMAINS}
        return texts, f"held-out corpus windows ({n_windows} x {seq_len} tokens per domain) from {corpus_dir}"
    rows = [json.loads(line) for line in Path(probes).read_text().splitlines() if line]
    texts = {d: tokenizer([r["text"] for r in rows if r["domain"] == d])["input_ids"] for d in DOMAINS}
    return texts, f"probe prompts {probes.name if isinstance(probes, Path) else probes}"


def routing_counts(model, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
    """How often each expert is among a token's top-k: int array ``[decoder layers, experts]``, 0 for dense layers.

    ``seqs``: token ids (BOS first); every real token counts, BOS included, padding not. The counts are
    :func:`moelens.analysis.expert_frequency`'s ``selections`` over all tokens, special ones included.
    """
    import numpy as np
    import torch

    from moelens.analysis.stats import expert_frequency
    from moelens.analysis.token_filter import TokenFilter
    from moelens.tracer import trace

    view = moe_view(model)
    counts = np.zeros((view.num_decoder_layers, max(layer.num_experts for layer in view.layers)), dtype=np.int64)
    with torch.no_grad(), trace(model) as tracer:
        for ids, mask in _batches(seqs, batch_size, model.config.pad_token_id):
            model(input_ids=ids, attention_mask=mask)
    frequency = expert_frequency(tracer, tokens=TokenFilter(kind="all", special=True))
    counts[frequency["layer"].to_numpy(), frequency["expert"].to_numpy()] = frequency["selections"].to_numpy()
    return counts


def mean_loss(model, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy (nats per token) over ``seqs`` (token ids): every real
    next-token prediction counts, pads excluded; computed by :func:`moelens.evaluation.next_token_nll`, as the
    super-experts analysis does."""
    import torch

    from moelens.evaluation import next_token_nll

    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in _batches(seqs, batch_size, model.config.pad_token_id):
            sums, counts = next_token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
            total += float(sums.sum())
            n += int(counts.sum())
    return total / n


def overused_experts(counts: dict[str, np.ndarray], domain: str, n: int) -> dict[int, list[int]]:
    """Per layer, the ``n`` experts whose share of ``domain``'s slots most exceeds the mean
    share of the other domains."""
    import numpy as np

    share = {d: c / c.sum(axis=1, keepdims=True) for d, c in counts.items()}
    others = np.mean([s for d, s in share.items() if d != domain], axis=0)
    excess = share[domain] - others
    return {layer: sorted(np.argsort(-excess[layer])[:n].tolist()) for layer in range(excess.shape[0])}


def nmi(joint_counts: np.ndarray) -> float:
    """``2 I(D; E) / (H(D) + H(E))`` from counts ``[domains, experts]``, domains weighted equally."""
    import numpy as np

    p = joint_counts / joint_counts.sum(axis=1, keepdims=True) / joint_counts.shape[0]
    pd, pe = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pd, pe)[nz])))
    entropy = lambda q: float(-np.sum(q[q > 0] * np.log(q[q > 0])))  # noqa: E731
    return 2 * mi / (entropy(pd) + entropy(pe))


def activation_stats(model, seqs: Sequence[Sequence[int]]) -> dict:
    """Massive-activation and attention-sink measurements on a few sequences.

    Per residual-stream state (embeddings, then the output of each layer): max |h|, median |h|, their
    ratio, and whether the max sits on the first (BOS) position. Per layer: the mean attention
    weight that queries at positions >= 1 put on position 0, averaged over heads and sequences.
    Massive means max |h| > 100 and ratio > 1000 (Sun et al.'s criterion).
    """
    import torch

    # Residual stream read with hooks (embeddings, then each decoder layer's output) rather than
    # from output_hidden_states, whose last entry may already be final-normed.
    modules = [model.get_input_embeddings(), *moe_view(model).decoder_layers]
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
               for m in modules]
    hidden = []
    try:
        with torch.no_grad():
            ids, mask = next(_batches(seqs, len(seqs), model.config.pad_token_id))
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    valid = mask.bool()
    for i, h in enumerate(captured):
        a = h.abs()
        flat = a[valid]
        where = torch.nonzero(a == flat.max())[0]
        hidden.append({"state": "embeddings" if i == 0 else f"layer {i - 1}",
                       "max_abs": round(flat.max().item(), 3), "median_abs": round(flat.median().item(), 5),
                       "ratio": round((flat.max() / flat.median()).item(), 1),
                       "max_on_first_token": bool(where[1].item() == 0)})
    sinks = SinkMass()  # the super-experts analysis' measurement; per layer here, the mean over heads
    sinks.add(out.attentions, TokenBatch.from_ids(ids, mask))
    sink = [round(v, 4) for v in sinks.frame().groupby("layer")["sink_mass"].mean().tolist()]
    massive = any(h["max_abs"] > 100 and h["ratio"] > 1000 for h in hidden)
    return {"hidden_states": hidden, "massive_activations": massive, "first_token_attention_mass": sink}


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[tuple]:
    """Right-padded ``(input_ids, attention_mask)`` batches."""
    import torch

    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        yield ids, mask


def _relative(losses: dict[str, float], base: dict[str, float], domain: str) -> dict:
    rel = {d: (losses[d] - base[d]) / base[d] for d in DOMAINS}
    others = [rel[d] for d in DOMAINS if d != domain]
    return {"own": rel[domain], "others_mean": sum(others) / len(others), "others_max": max(others),
            "worst_other": max((d for d in DOMAINS if d != domain), key=rel.get), "per_domain": rel}


def _ablation_table(targeted: dict[str, dict], random_runs: list[dict[str, float]]) -> dict:
    table = {}
    for domain, t in targeted.items():
        rand = [r[domain] for r in random_runs]
        mean = sum(rand) / len(rand)
        sd = math.sqrt(sum((x - mean) ** 2 for x in rand) / max(1, len(rand) - 1))
        table[domain] = {**t, "random_mean": mean, "random_sd": sd,
                         "passes": t["own"] > t["others_max"] and t["own"] > mean + 2 * sd}
    return table


def markdown(result: dict) -> str:
    """The evidence as markdown tables (what MODEL_CARD.md quotes)."""
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    lines = [f"Source: {result['source']}", "",
             "| layer | NMI(expert; domain) | unused experts |", "|---|---|---|"]
    lines += [f"| {l} | {v:.3f} | {len(u)} {u if u else ''} |"
              for l, (v, u) in enumerate(zip(result["nmi_per_layer"], result["unused_experts_per_layer"]))]
    lines += ["", f"Ablation: {result['n_ablate_per_layer']} experts per layer disabled (logits -inf, tokens "
              f"re-route); relative loss increase on the evaluation half; random = mean ± sd over "
              f"{result['random_seeds']} seeds.", "",
              "| domain | base loss | targeted: own | others mean | worst other | random: own | own > others & random |",
              "|---|---|---|---|---|---|---|"]
    for d, row in result["ablation"].items():
        lines.append(f"| {d} | {result['heldout_loss'][d]:.3f} | {pct(row['own'])} | {pct(row['others_mean'])} | "
                     f"{row['worst_other']} {pct(row['others_max'])} | {pct(row['random_mean'])} ± "
                     f"{100 * row['random_sd']:.1f} | {'yes' if row['passes'] else 'NO'} |")
    lines += ["", "| hidden state | max abs | median abs | ratio | max on BOS |", "|---|---|---|---|---|"]
    lines += [f"| {h['state']} | {h['max_abs']:.2f} | {h['median_abs']:.4f} | {h['ratio']:.0f} | "
              f"{'yes' if h['max_on_first_token'] else 'no'} |" for h in result["hidden_states"]]
    lines += ["", f"Massive activations (max > 100 and > 1000x median): "
              f"{'yes' if result['massive_activations'] else 'no'}",
              "First-token (BOS) attention mass per layer: "
              + ", ".join(f"{v:.3f}" for v in result["first_token_attention_mass"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: measure and print the evidence tables; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moelens.training.evidence", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=shipped_path("models", "moelens-tiny"))
    parser.add_argument("--corpus", type=Path, help="corpus folder; without it the probe prompts are used")
    parser.add_argument("--probes", type=Path, default=shipped_path("probes", "domains.jsonl"))
    parser.add_argument("--out", type=Path, help="where to write evidence-*.json/md (default: the model folder)")
    parser.add_argument("--seeds", type=int, default=10, help="random-ablation seeds (at least 5)")
    args = parser.parse_args(argv)
    result = evidence(args.model, args.corpus, out_dir=args.out, probes=args.probes,
                      options=EvidenceOptions(seeds=max(5, args.seeds)))
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
