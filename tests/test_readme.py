"""The README's Python examples run as written, in order, on the shipped model.

Each ```python block of the README is executed in one namespace (later blocks use what earlier
ones defined, as a reader would). Names a block uses without defining (the workbench block's
``ftri``, ``card``, ``layer``...) are given first, built from what the earlier blocks made. The
store ``runs/domains`` that the analysis block opens is made by the README's ``moelens collect``
command line, run on a subset of the same prompt file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) >= 5
    hub = [b for b in blocks if re.search(r'moelens\.load\("[^":]+/[^"]+"', b)]  # a hub id: not reachable here
    runnable = [b for b in blocks if b not in hub]
    assert len(hub) == 1 and len(runnable) == len(blocks) - 1

    from moelens.cli import main

    command = re.search(r"^moelens (collect .*data/probes/domains\.jsonl.*)$", (ROOT / "README.md").read_text(), flags=re.M)
    assert command is not None, "the README's collect command line"
    records = [json.loads(line) for line in (ROOT / "data/probes/domains.jsonl").read_text().splitlines()]
    subset = [r for d in ("python", "de", "en") for r in [r for r in records if r["domain"] == d][:12]]
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "domains.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in subset))
    assert main(command.group(1).replace("data/probes/domains.jsonl", str(prompts)).split()) in (0, None)

    namespace: dict = {"__name__": "readme"}
    for block in runnable:
        if "ExpertGrid(" in block:  # the workbench block: what a notebook would have made by then
            exec(
                "from moelens.interventions import intervene\n"
                "ftri = {'de': analysis.ftri_scores(store, tag='domain', target='de')}\n"
                "npmi = analysis.npmi_scores(store, markers=['def', 'return'])\n"
                "trace = baseline_trace = moelens.trace(model, prompts=['Die Datei wird'], tokenizer=tokenizer)\n"
                "with intervene(model, spec):\n"
                "    steered_trace = moelens.trace(model, prompts=['Die Datei wird'], tokenizer=tokenizer)\n"
                "layer, expert = trace.layers[0], 0\n"
                "card = lambda l, e: card_html(expert_card(trace, l, e, ftri=ftri))\n"
                "from moelens.widgets import card_html, expert_card\n",
                namespace,
            )
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "ftri.html").stat().st_size > 0
    assert len(namespace["tr"].prompts) == 2 and set(namespace["tr"].prompts["domain"]) == {"code", "de"}
    assert type(namespace["grid"]).__name__ == "ExpertGrid" and namespace["grid"].state.problem(namespace["model"]) is None
