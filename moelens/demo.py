"""``make demo``: the main job on the shipped model, end to end.

1. trace half of the domain probes (``data/probes/domains.jsonl``) into a trace store;
2. find each domain's experts with fTRI (per-prompt permutation test, BH-corrected);
3. check them causally: disable each domain's top experts (2 per layer) and measure the loss on
   the other, held-out half of the probes of every domain, next to disabling random experts;
4. steer generation: SCMoE self-contrast decoding vs greedy on arithmetic tasks;
5. write CSV tables and offline HTML figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from moelens.loading import shipped_path

EXPERTS_PER_LAYER = 2
RANDOM_SEEDS = 5


def _split_probes(out: Path) -> tuple[Path, dict[str, list[str]]]:
    """Write the discovery half of the domain probes to ``out``; return it and the held-out half."""
    records = [json.loads(line) for line in shipped_path("probes", "domains.jsonl").read_text().splitlines() if line.strip()]
    discovery = records[::2]
    held_out: dict[str, list[str]] = {}
    for record in records[1::2]:
        held_out.setdefault(record["domain"], []).append(record["text"])
    path = out / "discovery.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in discovery))
    return path, held_out


def _domain_experts(store: Any, domains: list[str], out: Path) -> dict[str, dict[int, list[int]]]:
    from moelens import analysis

    chosen = {}
    for domain in domains:
        table = analysis.ftri_scores(store, tag="domain", target=domain)
        table.to_csv(out / f"ftri_{domain}.csv", index=False)
        title = f"fTRI: {domain} minus the other domains (prompt tokens)"
        analysis.write_html(analysis.heatmap(table, "difference", title=title), out / f"ftri_{domain}.html")
        top = table.sort_values("difference", ascending=False).groupby("layer").head(EXPERTS_PER_LAYER)
        chosen[domain] = {int(layer): sorted(group["expert"].astype(int).tolist()) for layer, group in top.groupby("layer")}
        significant = int((table["q_value"] < 0.05).sum())
        print(f"  {domain:<7} top experts per layer {chosen[domain]}  ({significant} (layer, expert) pairs with q < 0.05)")
    return chosen


def _ablation_table(model: Any, tokenizer: Any, chosen: dict[str, dict[int, list[int]]], held_out: dict[str, list[str]]) -> list[dict[str, Any]]:
    from moelens.evaluation import mean_token_loss
    from moelens.hooks.adapters import moe_layers
    from moelens.interventions import disable, intervene

    def losses() -> dict[str, float]:
        return {domain: mean_token_loss(model, tokenizer, texts, batch_size=32) for domain, texts in held_out.items()}

    base = losses()
    layers = moe_layers(model)
    rows = []
    for domain, experts in chosen.items():
        with intervene(model, disable(experts)):
            targeted = losses()
        random_own = []
        for seed in range(RANDOM_SEEDS):
            rng = random.Random(seed)
            control = {layer.index: rng.sample(range(layer.num_experts), EXPERTS_PER_LAYER) for layer in layers}
            with intervene(model, disable(control)):
                random_own.append(mean_token_loss(model, tokenizer, held_out[domain], batch_size=32))
        others = [d for d in held_out if d != domain]
        rows.append(
            {
                "domain": domain,
                "own_increase": targeted[domain] / base[domain] - 1,
                "others_mean_increase": sum(targeted[d] / base[d] - 1 for d in others) / len(others),
                "random_own_increase": sum(r / base[domain] - 1 for r in random_own) / RANDOM_SEEDS,
            }
        )
    return rows


def _arith_contrast(model: Any, tokenizer: Any, limit: int = 60) -> dict[str, tuple[float, float]]:
    """(exact-answer accuracy, share of answer characters right in place) for greedy and SCMoE."""
    from moelens.interventions.contrast import generate_contrast

    tasks = [json.loads(line) for line in shipped_path("probes", "arith_tasks.jsonl").read_text().splitlines() if line.strip()][:limit]
    prompts, answers = [t["text"] for t in tasks], [t["answer"] for t in tasks]
    scored = {}
    for name, beta, alpha in (("greedy", 0.0, 1.0), ("scmoe", 0.5, 0.1)):
        texts = generate_contrast(model, tokenizer, prompts, beta=beta, alpha=alpha, max_new_tokens=8).texts
        guesses = [text.strip().split("\n")[0] for text in texts]
        exact = sum(g == a for g, a in zip(guesses, answers)) / len(tasks)
        characters = sum(sum(x == y for x, y in zip(g, a)) / len(a) for g, a in zip(guesses, answers)) / len(tasks)
        scored[name] = (exact, characters)
    return scored


def run(out: Path, model_name: str = "moelens-tiny") -> None:
    """The demo (see the module docstring): prints its findings and writes tables and figures to ``out``."""
    import pandas as pd

    import moelens
    from moelens import analysis
    from moelens.collect import CollectOptions, collect

    store_dir = out / "store"
    if store_dir.exists():
        shutil.rmtree(store_dir)  # the demo's own output from an earlier run
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = moelens.load(model_name)
    discovery, held_out = _split_probes(out)
    print(f"1. tracing {sum(1 for _ in discovery.open())} discovery prompts through {model_name} -> {store_dir}")
    store = collect(model_name, discovery, store_dir, CollectOptions(batch_size=16, max_new_tokens=4, progress=False))
    balance = analysis.load_balance(store)
    print(balance[["layer", "experts", "cv", "gini", "max_over_mean", "normalized_entropy"]].round(3).to_string(index=False))
    print("\n2. fTRI: experts specific to each domain (target domain vs the others)")
    chosen = _domain_experts(store, sorted(held_out), out)
    print("\n3. causal check on the held-out half: relative loss increase when the domain's experts are disabled")
    table = pd.DataFrame(_ablation_table(model, tokenizer, chosen, held_out))
    table.to_csv(out / "ablation.csv", index=False)
    print((table.set_index("domain") * 100).round(1).rename(columns=lambda c: c + " %").to_string())
    print("\n4. SCMoE self-contrast decoding on arithmetic tasks (weak = rank(1): each token's second choice, beta 0.5, alpha 0.1)")
    for name, (exact, characters) in _arith_contrast(model, tokenizer).items():
        print(f"  {name:<7} exact answers {exact:6.1%}   answer characters right {characters:6.1%}")
    analysis.write_html(analysis.token_view(store, prompt_id=0, layer=max(store.manifest.moe_layers)), out / "token_view.html")
    print(f"\nTables (CSV) and figures (HTML, offline) in {out}")


def main(argv: list[str] | None = None) -> int:
    """``python -m moelens.demo [--out DIR] [--model NAME]``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", default="moelens-tiny")
    args = parser.parse_args(argv)
    run(args.out, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
