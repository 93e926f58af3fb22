"""Write the notebooks from this script, so their source is reviewable Python (run it after edits)."""

from __future__ import annotations

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
    new_code_cell("trace.tokens.query('prompt_id == 2')[['position', 'token', 'generated']].T"),
    new_markdown_cell("## Query with DuckDB\nThe same tables are DuckDB views: which experts does each prompt use most in the last layer?"),
    new_code_cell(
        "last = max(trace.routes.layer)\n"
        "trace.sql(f'''\n"
        "    SELECT prompt_id, expert, count(*) AS selections, round(avg(weight), 3) AS mean_weight\n"
        "    FROM routes WHERE layer = {last}\n"
        "    GROUP BY ALL QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY selections DESC) <= 2\n"
        "    ORDER BY prompt_id, selections DESC\n"
        "''')"
    ),
    new_markdown_cell("## A trace store on disk\n`moelens collect` (here called from Python) writes Parquet shards; `read_trace` opens them without loading everything."),
    new_code_cell(
        "import json, tempfile, pathlib\n"
        "from moelens.cli import main as moelens_cli\n\n"
        "work = pathlib.Path(tempfile.mkdtemp())\n"
        "(work / 'prompts.jsonl').write_text(''.join(json.dumps({'text': t, 'lang': l}) + '\\n' for t, l in zip(prompts, ['py', 'de', 'arith', 'en'])))\n"
        "moelens_cli(['collect', 'moelens-tiny', str(work / 'prompts.jsonl'), '--out', str(work / 'store'), '--no-progress'])\n"
        "store = moelens.read_trace(work / 'store')\n"
        "store.sql('SELECT p.lang, r.layer, r.expert, count(*) AS n FROM routes r JOIN prompts p USING (prompt_id) '\n"
        "          'WHERE r.rank = 0 GROUP BY ALL ORDER BY n DESC LIMIT 8')"
    ),
]


def main() -> None:
    notebook = new_notebook(cells=QUICKSTART, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(notebook, HERE / "01_quickstart.ipynb")


if __name__ == "__main__":
    main()
