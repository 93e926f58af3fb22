"""Write the notebooks from this script, so their source is reviewable Python (run it after edits)."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    new_markdown_cell(
        "# moelens quickstart\n\n"
        "Load the shipped trained MoE (`moelens-tiny`, a 4-layer Qwen3-MoE trained on code, man pages in four "
        "languages and arithmetic), record which experts its routers choose, and query the routes with pandas and DuckDB."
    ),
    new_code_cell("import moelens\n\nmodel, tokenizer = moelens.load('moelens-tiny')\nmodel.config.num_experts, model.config.num_experts_per_tok"),
    new_markdown_cell("## Trace a few prompts, with generation\n`moelens.trace` records every real token's routing at every MoE layer: the prompt's tokens and each generated token."),
    new_code_cell(
        "import torch\n\n"
        "prompts = ['def add(a, b):\\n    return', 'Die Datei wird gelesen und', '123 + 456 =', 'The file is opened and']\n"
        "batch = tokenizer(prompts, return_tensors='pt', padding=True, padding_side='left')\n"
        "with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as trace:\n"
        "    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)\n"
        "trace.routes.head(8)"
    ),
    new_markdown_cell("`token` is the tokenizer's vocabulary string (`Ġ` stands for a space); `token_pieces` gives the text each token adds."),
    new_code_cell(
        "from moelens.widgets import token_pieces\n\n"
        "tokens = trace.tokens.query('prompt_id == 2')\n"
        "tokens.assign(text=token_pieces(tokens.token_id.tolist(), tokens.token.tolist(), tokenizer=tokenizer))[['position', 'token', 'text', 'generated']].T"
    ),
    new_markdown_cell("## Query with DuckDB\nThe same tables are DuckDB views: which experts does each prompt use most in the last layer?"),
    new_code_cell(
        "last = max(trace.routes.layer)\n"
        "trace.sql(f'''\n"
        "    SELECT prompt_id, expert, count(*) AS selections, round(avg(weight), 3) AS mean_weight\n"
        "    FROM routes WHERE layer = {last}\n"
        "    GROUP BY prompt_id, expert QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY selections DESC) <= 2\n"
        "    ORDER BY prompt_id, selections DESC\n"
        "''')"
    ),
    new_markdown_cell(
        "## A trace store on disk\n`collect` writes Parquet shards from prompt records (or a prompt file; on the command line: "
        "`moelens collect MODEL prompts.jsonl --out DIR`); `scan_trace` opens a store lazily, without loading everything."
    ),
    new_code_cell(
        "import tempfile, pathlib\n"
        "from moelens.collect import CollectOptions, collect\n\n"
        "work = pathlib.Path(tempfile.mkdtemp())\n"
        "records = [{'text': t, 'lang': l} for t, l in zip(prompts, ['py', 'de', 'arith', 'en'])]\n"
        "collect(model, records, work / 'store', CollectOptions(progress=False), tokenizer=tokenizer)\n"
        "store = moelens.scan_trace(work / 'store')\n"
        "store.sql('SELECT p.lang, r.layer, r.expert, count(*) AS n FROM routes r JOIN prompts p USING (prompt_id) '\n"
        "          'WHERE r.rank = 0 GROUP BY ALL ORDER BY n DESC LIMIT 8')"
    ),
]


# --- shared cells ---------------------------------------------------------------------------------
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}

# the first PER_DOMAIN probes of each domain, traced into a small store (collect reloads the model:
# about a second for moelens-tiny); the next PER_DOMAIN of each domain are held out for losses
PROBE_STORE = new_code_cell(
    "import collections, json, pathlib, tempfile\n"
    "from moelens.collect import CollectOptions, collect\n\n"
    "PROBES = pathlib.Path('..') / 'data' / 'probes'  # notebooks run from notebooks/\n"
    "PER_DOMAIN = 20\n"
    "by_domain = collections.defaultdict(list)\n"
    "for line in (PROBES / 'domains.jsonl').read_text().splitlines():\n"
    "    record = json.loads(line)\n"
    "    by_domain[record['domain']].append(record)\n"
    "work = pathlib.Path(tempfile.mkdtemp())\n"
    "(work / 'probes.jsonl').write_text(''.join(json.dumps(r) + '\\n' for records in by_domain.values() for r in records[:PER_DOMAIN]))\n"
    "store = collect('moelens-tiny', work / 'probes.jsonl', work / 'store', CollectOptions(batch_size=16, progress=False))\n"
    "held_out = {domain: [r['text'] for r in records[PER_DOMAIN : 2 * PER_DOMAIN]] for domain, records in by_domain.items()}\n"
    "store.sql('SELECT p.domain, count(DISTINCT p.prompt_id) AS prompts, count(*) AS routing_events FROM routes r JOIN prompts p USING (prompt_id) GROUP BY ALL ORDER BY ALL')"
)

LOAD_MODEL = new_code_cell("import moelens, torch\nfrom moelens import analysis\n\nmodel, tokenizer = moelens.load('moelens-tiny')")

STEERING = [
    new_markdown_cell(
        "# Steering moelens-tiny\n\n"
        "Find the experts a domain relies on (fTRI contrast maps over a trace store), then change routing at inference: "
        "disable them, reweight them, switch to top-p routing, and decode with SCMoE self-contrast. Every change is a small "
        "JSON spec applied with `moelens.intervene`; the model is bitwise restored when the block ends. "
        "The last cell is an interactive grid to try your own combinations."
    ),
    LOAD_MODEL,
    new_markdown_cell("## A small trace store\n20 probe prompts per domain (Python, C headers, man pages in en/de/fr/es, arithmetic)."),
    PROBE_STORE,
    new_markdown_cell(
        "## German experts by fTRI\n`ftri_scores` compares each (layer, expert)'s activation rate on German prompts with the mean over the other "
        "domains, counting the prompts' own tokens (no BOS, no generated tokens: `.attrs['tokens']` says so), with a sequential "
        "permutation test over prompts (q-values are Benjamini-Hochberg adjusted; `.attrs['p_floor']` is the smallest p it can give)."
    ),
    new_code_cell(
        "ftri = {domain: analysis.ftri_scores(store, tag='domain', target=domain) for domain in by_domain}\n"
        "analysis.heatmap(ftri['de'], 'difference', title='fTRI: German minus other domains').show()\n"
        "ftri['de'].head(8)[['layer', 'expert', 'target_rate', 'reference_rate', 'difference', 'q_value']]"
    ),
    new_markdown_cell(
        "## Disable them\nThe 8 most German-specific experts (over all layers), disabled with re-routing (the next-best expert takes the slot). "
        "Loss on held-out German text rises much more than on the other domains."
    ),
    new_code_cell(
        "import pandas as pd\n"
        "from moelens.evaluation import mean_token_loss\n"
        "from moelens.interventions import disable, reweight, top_p, intervene\n\n"
        "no_german = analysis.ftri_spec(ftri['de'], 8, kind='reroute')\n"
        "print(no_german.to_json())\n\n"
        "def losses(spec=None):\n"
        "    '''Mean held-out loss per domain, optionally under an intervention.'''\n"
        "    if spec is None:\n"
        "        return {domain: mean_token_loss(model, tokenizer, texts) for domain, texts in held_out.items()}\n"
        "    with intervene(model, spec):\n"
        "        return losses()\n\n"
        "baseline_loss = losses()\n"
        "loss_table = pd.DataFrame({'baseline': baseline_loss, 'German experts disabled': losses(no_german)})\n"
        "loss_table['change'] = (loss_table.iloc[:, 1] / loss_table['baseline'] - 1).map('{:+.1%}'.format)\n"
        "loss_table"
    ),
    new_markdown_cell(
        "Generations side by side: `ExpertGridState` (the state behind the widget below) generates each prompt greedily with "
        "and without its spec, and reports the fraction of routing decisions (token x layer) that changed."
    ),
    new_code_cell(
        "from moelens.widgets import ExpertGridState\n\n"
        "def side_by_side(spec, prompts, max_new_tokens=16):\n"
        "    '''Baseline vs steered greedy continuations of prompts under spec.'''\n"
        "    rows = ExpertGridState.from_spec(spec, model).compare(model, tokenizer, prompts, max_new_tokens)\n"
        "    return pd.DataFrame([(r.prompt, r.baseline, r.steered, f'{r.routing_changed:.0%}') for r in rows],\n"
        "                        columns=['prompt', 'baseline', 'steered', 'routing changed'])\n\n"
        "manual_prompts = ['Die Option wird ignoriert, wenn', 'The option is ignored when']\n"
        "side_by_side(no_german, manual_prompts)"
    ),
    new_markdown_cell(
        "## Reweight\nInstead of removing experts, multiply their routing weights (RICE-style steering). Boosting the German experts "
        "on generated tokens only leaves the prompt's routing untouched."
    ),
    new_code_cell(
        "boost_german = reweight(analysis.ftri_top_experts(ftri['de'], 8), 8.0, tokens='generated')\n"
        "side_by_side(boost_german, manual_prompts)"
    ),
    new_markdown_cell(
        "## Top-p routing\nDynamic routing: each token uses the smallest set of experts whose router probability exceeds p "
        "(at most 4 here) instead of a fixed top-2. moelens-tiny normalises its top-2 weights, so the top-p weights are "
        "renormalised too; with raw probabilities every expert is under-weighted and the loss rises sharply."
    ),
    new_code_cell(
        "def experts_per_token(spec, texts):\n"
        "    '''Mean number of experts a token uses per MoE layer under spec.'''\n"
        "    batch = tokenizer(texts, return_tensors='pt', padding=True)\n"
        "    with torch.no_grad(), intervene(model, spec), moelens.trace(model) as tracer:\n"
        "        model(**batch)\n"
        "    return tracer.routes.groupby(['prompt_id', 'position', 'layer']).size().mean()\n\n"
        "def mean_loss(spec=None):\n"
        "    return sum(losses(spec).values()) / len(held_out)\n\n"
        "sample = [texts[0] for texts in held_out.values()]\n"
        "dynamic = {p: top_p(p, max_k=4, renormalize=True) for p in (0.2, 0.3, 0.5)}\n"
        "print(f'top-2 routing: 2 experts per token, mean loss {mean_loss():.3f}')\n"
        "pd.DataFrame([{'p': p, 'experts per token': experts_per_token(spec, sample), 'mean loss': mean_loss(spec)} for p, spec in dynamic.items()])"
    ),
    new_markdown_cell(
        "## SCMoE self-contrast decoding\n`generate_contrast` contrasts the model's logits with those of a weak activation "
        "(each token routed only to its second choice, `rank(1)`), inside one batched forward per step. moelens-tiny is far too small "
        "for multi-digit arithmetic, so exact answers are rare either way; the scores also count the right first digit and "
        "the right length. On a model this small the contrast does not help: the mechanism is the point here."
    ),
    new_code_cell(
        "tasks = [json.loads(line) for line in (PROBES / 'arith_tasks.jsonl').read_text().splitlines()][:24]\n"
        "questions = [t['text'] for t in tasks]\n\n"
        "def scores(texts):\n"
        "    '''Fractions of tasks whose answer (the continuation's first line) is exact, starts right, has the right length.'''\n"
        "    pairs = [(text.strip().split('\\n')[0].strip(), t['answer']) for text, t in zip(texts, tasks)]\n"
        "    return {'exact': sum(a == b for a, b in pairs) / len(pairs), 'first digit': sum(a[:1] == b[:1] for a, b in pairs) / len(pairs),\n"
        "            'length': sum(len(a) == len(b) for a, b in pairs) / len(pairs)}\n\n"
        "batch = tokenizer(questions, return_tensors='pt', padding=True, padding_side='left')\n"
        "with torch.no_grad():\n"
        "    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)\n"
        "greedy_texts = tokenizer.batch_decode(greedy[:, batch['input_ids'].shape[1]:], skip_special_tokens=True)\n"
        "contrast = moelens.generate_contrast(model, tokenizer, questions, beta=0.5, alpha=0.1, max_new_tokens=6)\n"
        "display(pd.DataFrame({'greedy': scores(greedy_texts), 'SCMoE': scores(contrast.texts)}).T)\n"
        "pd.DataFrame({'question': [q.split('\\n')[-1] for q in questions], 'answer': [t['answer'] for t in tasks],\n"
        "              'greedy': greedy_texts, 'SCMoE': contrast.texts}).head(6)"
    ),
    new_markdown_cell(
        "## The steering grid\nClick cells to disable (red), force (green) or boost (orange) experts; the grid checks the "
        "combination against the model before generating (e.g. at most top-k forced experts per layer). "
        "\"Mark top experts\" paints a domain's top fTRI experts. It starts with the German experts disabled."
    ),
    new_code_cell(
        "from moelens.widgets import ExpertGrid\n\n"
        "grid = ExpertGrid(model, tokenizer, ExpertGridState.from_spec(no_german, model), prompts='\\n'.join(manual_prompts), ftri_tables=ftri)\n"
        "grid"
    ),
    new_code_cell("grid.state.summary(), grid.state.to_spec().to_json()"),
]

SPECIALIZATION = [
    new_markdown_cell(
        "# Expert specialization in moelens-tiny\n\n"
        "Descriptive statistics of routing (load balance, entropy, co-activation), domain-specific experts (fTRI), "
        "token-level associations (nPMI), a token view, and super experts. Figures are plotly, rendered offline; "
        "`analysis.write_html` exports any of them as a standalone file."
    ),
    LOAD_MODEL,
    PROBE_STORE,
    new_markdown_cell(
        "## Load balance and routing entropy\nPer layer, how evenly the tokens spread over the 16 experts (Gini 0 and normalised "
        "entropy 1 = perfectly even); per domain and layer, how evenly each token splits its weight between its two experts."
    ),
    new_code_cell("analysis.load_balance(store).round(3)"),
    new_code_cell(
        "# mean entropy (bits) of each token's top-2 routing weights; 1 bit = both experts weigh the same\n"
        "analysis.token_entropy(store, by=['domain']).pivot(index='domain', columns='layer', values='mean_entropy').round(3)"
    ),
    new_markdown_cell("## Co-activation\nHow often two experts are chosen together for the same token (last layer)."),
    new_code_cell(
        "pairs = analysis.coactivation(store)\n"
        "last_layer = int(pairs['layer'].max())\n"
        "analysis.coactivation_matrix(pairs, last_layer, num_experts=model.config.num_experts).show()"
    ),
    new_markdown_cell("## Domain-specific experts (fTRI)\nThe Python experts stand out against every other domain; the export is one offline HTML file."),
    new_code_cell(
        "python_experts = analysis.ftri_scores(store, tag='domain', target='python')\n"
        "figure = analysis.heatmap(python_experts, 'difference', title='fTRI: Python minus other domains')\n"
        "print('written', analysis.write_html(figure, work / 'ftri_python.html'))\n"
        "figure.show()\n"
        "python_experts.head(5)[['layer', 'expert', 'target_rate', 'reference_rate', 'difference', 'q_value']]"
    ),
    new_markdown_cell(
        "## Token-level associations (nPMI)\nThe marker tokens of `markers.jsonl` (`def`, `return`, `=`, `#include`): which experts "
        "fire on them? nPMI matches token strings as the tokenizer writes them: each marker is matched with and without "
        "its leading-space `Ġ`, and a marker the tokenizer splits (`#include` is `#` + `include`) by its last piece."
    ),
    new_code_cell(
        "import pandas as pd\n\n"
        "marker_records = [json.loads(line) for line in (PROBES / 'markers.jsonl').read_text().splitlines()][::5]\n"
        "# the store keeps text and domain: nPMI finds the markers among the traced tokens\n"
        "(work / 'markers.jsonl').write_text(''.join(json.dumps({'text': r['text'], 'domain': r['domain']}) + '\\n' for r in marker_records))\n"
        "marker_store = collect('moelens-tiny', work / 'markers.jsonl', work / 'marker_store', CollectOptions(batch_size=16, progress=False))\n"
        "markers = sorted({m for r in marker_records for m in r['markers']})\n\n"
        "def marker_tokens(marker):\n"
        "    piece = tokenizer.tokenize(marker)[-1]\n"
        "    return [piece, 'Ġ' + piece]\n\n"
        "top_per_marker = pd.concat(\n"
        "    analysis.npmi_scores(marker_store, markers=marker_tokens(m)).head(3).assign(marker=m) for m in markers\n"
        ")\n"
        "top_per_marker[['marker', 'layer', 'expert', 'joint_tokens', 'npmi']]"
    ),
    new_markdown_cell("## Token view\nOne Python prompt, each token coloured by its top expert in the last layer; hover for every layer's experts."),
    new_code_cell(
        "first_python = store.prompts.query(\"domain == 'python'\")['prompt_id'].min()\n"
        "analysis.token_view(store, first_python, last_layer).show()"
    ),
    new_markdown_cell(
        "## Super experts\nExperts whose output has rare, huge activations (Super Experts, 2025): profiled on a few calibration texts. "
        "moelens-tiny is small and has no massive activations, so few experts are flagged (layer 0's expert 15, far above the "
        "rest); thresholds come from the layers before 75% of the depth, as in the authors' code. The table shows the largest outputs."
    ),
    new_code_cell(
        "calibration = [json.loads(line)['text'] for line in (PROBES / 'calibration.jsonl').read_text().splitlines()]\n"
        "profiled, held_out_calibration = calibration[:16], calibration[16:32]\n"
        "report = analysis.profile_super_experts(model, tokenizer, profiled)\n"
        "flagged = analysis.super_experts_top_experts(report)  # {layer: [experts]}\n"
        "print('flagged:', flagged or 'none', '| thresholds:', {k: round(v, 2) if isinstance(v, float) else v for k, v in report.thresholds.items()})\n"
        "report.experts.sort_values('max_output', ascending=False).head(6)"
    ),
    new_markdown_cell(
        "Dropping the flagged experts (output zeroed, weight not given to the others) against as many random experts, "
        "on other calibration texts: loss, largest residual activation and attention-sink mass."
    ),
    new_code_cell(
        "if flagged:\n"
        "    print(analysis.drop_report(model, tokenizer, held_out_calibration, report))"
    ),
]

EXPLORER = [
    new_markdown_cell(
        "# Exploring routing: the explorer, expert cards and linked views\n\n"
        "Trace probe prompts in memory (no files), find the experts German text relies on, then look at what "
        "disabling them does token by token (routing explorer), what one expert is about (expert card), and steer "
        "from a heatmap click (linked views)."
    ),
    LOAD_MODEL,
    new_markdown_cell(
        "## An in-memory trace with tags\n`moelens.trace(model, prompts=..., tags=...)` runs the prompts now (batched and "
        "padded as `collect` does) and returns a trace whose `prompts` table carries the tags, so every analysis takes it."
    ),
    new_code_cell(
        "import json, pathlib\n"
        "from IPython.display import HTML, display\n\n"
        "PROBES = pathlib.Path('..') / 'data' / 'probes'  # notebooks run from notebooks/\n"
        "records = [json.loads(line) for line in (PROBES / 'domains.jsonl').read_text().splitlines()]\n"
        "sample = [r for domain in sorted({r['domain'] for r in records}) for r in [x for x in records if x['domain'] == domain][:12]]\n"
        "texts, domains = [r['text'] for r in sample], [r['domain'] for r in sample]\n"
        "baseline = moelens.trace(model, prompts=texts, tags={'domain': domains}, tokenizer=tokenizer)\n"
        "baseline.prompts.groupby('domain').size().rename('prompts').to_frame().T"
    ),
    new_code_cell(
        "ftri = {domain: analysis.ftri_scores(baseline, tag='domain', target=domain) for domain in sorted(set(domains))}\n"
        "no_german = analysis.ftri_spec(ftri['de'], 8, kind='reroute')\n"
        "with moelens.intervene(model, no_german):\n"
        "    steered = moelens.trace(model, prompts=texts, tags={'domain': domains}, tokenizer=tokenizer)\n"
        "print('disabled:', no_german.to_json())"
    ),
    new_markdown_cell(
        "## The routing explorer\nA German prompt, each token coloured by its first-choice expert at the chosen layer "
        "(hover or click a token for its experts and weights at every layer). The steered run is aligned below the "
        "baseline: outlined tokens are decisions that changed, and the bars give the share of changed positions per layer."
    ),
    new_code_cell(
        "from moelens.widgets import RoutingExplorer\n\n"
        "german = int(baseline.prompts.query(\"domain == 'de'\")['prompt_id'].min())\n"
        "explorer = RoutingExplorer(baseline, steered, tokenizer=tokenizer, prompt_id=german, names=('baseline', 'German experts disabled'))\n"
        "explorer"
    ),
    new_markdown_cell(
        "## An expert card\nThe expert German text over-uses most: its load, its fTRI contrasts against every domain, and the "
        "contexts where the router gives it the highest weight (the chosen token highlighted)."
    ),
    new_code_cell(
        "from moelens.widgets import card_html, expert_card\n\n"
        "top = ftri['de'].iloc[0]\n\n"
        "def card(layer, expert):\n"
        "    '''The expert card of (layer, expert) over the baseline trace, as HTML.'''\n"
        "    return card_html(expert_card(baseline, layer, expert, ftri=ftri, tokenizer=tokenizer))\n\n"
        "HTML(card(int(top.layer), int(top.expert)))"
    ),
    new_markdown_cell(
        "## Linked views\nClick a cell of the fTRI heatmap: the expert is selected in the steering grid and its card opens "
        "there; the grid's *selection* buttons then disable, force or boost the selected experts, and *Generate* compares "
        "the result with the baseline. The grid is shaded by the German fTRI difference."
    ),
    new_code_cell(
        "from moelens.widgets import ExpertGrid, linked_heatmap\n\n"
        "grid = ExpertGrid(model, tokenizer, prompts='Die Option wird ignoriert, wenn', ftri_tables=ftri, card=card)\n"
        "grid.shading.value = 'fTRI difference: de'\n"
        "heatmap = linked_heatmap(\n"
        "    analysis.heatmap(ftri['de'], 'difference', title='fTRI difference: German (de) minus the other domains'),\n"
        "    lambda layer, expert: grid.state.select([(layer, expert)]),\n"
        ")\n"
        "grid.state.select([(int(top.layer), int(top.expert))])  # what a click on that cell does\n"
        "display(heatmap, grid)"
    ),
]

NOTEBOOKS = {"01_quickstart": QUICKSTART, "02_steering": STEERING, "03_specialization": SPECIALIZATION, "04_explorer": EXPLORER}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        # numbered cell ids (instead of random ones) keep the diff of a regenerated notebook to real changes;
        # copies, because the shared cells appear in several notebooks
        numbered = [copy.deepcopy(cell) | {"id": f"cell-{index:02d}"} for index, cell in enumerate(cells)]
        nbformat.write(new_notebook(cells=[nbformat.from_dict(cell) for cell in numbered], metadata=KERNEL), HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
