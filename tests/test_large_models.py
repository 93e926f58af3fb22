"""Models as users of large MoEs load them: hub ids from the Hugging Face cache, and models
dispatched with ``device_map`` over cpu and disk (accelerate's offload hooks). Ground truth: the
same model loaded whole into memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import moelens
from moelens.cli import main
from moelens.interventions import disable, intervene, reweight, top_p
from moelens.interventions.contrast import generate_contrast
from moelens.loading import shipped_path

pytest.importorskip("accelerate")

PROMPTS = ["def add(a, b):", "Die Datei wird", "12 + 7 ="]
# layers 1 and 2 live on disk between calls: their parameters are `meta` tensors outside their forward
OFFLOADED = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def _hub_cache(root, repo_id: str) -> None:
    """The Hugging Face cache layout (models--org--name/{refs/main, snapshots/<commit>/...}) holding the shipped model."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(shipped_path("models", "moelens-tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _offline_python(code: str, cache) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_a_hub_id_loads_offline_from_the_cache(tmp_path):
    _hub_cache(tmp_path, "moelens-test/tiny-moe")
    result = _offline_python(
        "import moelens, torch\n"
        "model, tok = moelens.load('moelens-test/tiny-moe')\n"
        "with torch.no_grad(), moelens.trace(model) as tr:\n"
        "    model(**tok(['def add(a, b):'], return_tensors='pt'))\n"
        "print(model.config.model_type, tr.routes['layer'].nunique())",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["qwen3_moe", "4"]


@pytest.mark.slow
def test_a_hub_id_neither_cached_nor_reachable_says_what_to_do(tmp_path):
    result = _offline_python("import moelens\nmoelens.load('moelens-test/not-there')", tmp_path)
    assert result.returncode != 0
    assert "hub id 'moelens-test/not-there' could not be loaded: it is not in the local Hugging Face cache" in result.stderr
    assert "huggingface-cli download moelens-test/not-there" in result.stderr


def test_from_pretrained_options_are_forwarded_and_refused_for_tiny_models(tmp_path):
    model, _ = moelens.load("moelens-tiny", attn_implementation="eager", experts_implementation="eager")
    assert model.config._attn_implementation == "eager" and model.config._experts_implementation == "eager"
    with pytest.raises(TypeError, match=r"\['revision'\] do not apply to 'tiny:mixtral'"):
        moelens.load("tiny:mixtral", revision="main")


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    model, tokenizer = moelens.load("moelens-tiny", device_map=OFFLOADED, offload_folder=str(tmp_path_factory.mktemp("offload")))
    assert model.model.layers[1].mlp.gate.weight.device.type == "meta"  # really offloaded
    whole, _ = moelens.load("moelens-tiny")
    return model, whole, tokenizer


def test_an_offloaded_model_traces_like_the_model_in_memory(offloaded):
    model, whole, tokenizer = offloaded
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    traces = []
    for m in (model, whole):
        with torch.no_grad(), moelens.trace(m, tokenizer=tokenizer) as tracer:
            m.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        traces.append(tracer)
    keys = ["prompt_id", "position", "layer", "rank"]
    got, expected = (t.routes.sort_values(keys).reset_index(drop=True) for t in traces)
    assert len(got) > 0
    pd.testing.assert_frame_equal(got[keys + ["expert"]], expected[keys + ["expert"]])
    assert got["weight"].to_numpy() == pytest.approx(expected["weight"].to_numpy(), rel=2e-3, abs=1e-3)


@pytest.mark.parametrize("spec", [disable({2: [0, 1, 2]}), reweight({1: [3]}, 4.0) + top_p(0.6, layers=[3])], ids=["disable", "reweight+top-p"])
def test_interventions_on_an_offloaded_model_equal_the_model_in_memory(offloaded, spec):
    model, whole, tokenizer = offloaded
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    logits = []
    for m in (model, whole):
        with torch.no_grad(), intervene(m, spec):
            logits.append(m(**batch).logits)
    with torch.no_grad():
        plain = whole(**batch).logits
    assert not torch.allclose(logits[1], plain, atol=1e-3)  # the spec changes the output
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_scmoe_on_an_offloaded_model_equals_the_model_in_memory(offloaded):
    model, whole, tokenizer = offloaded
    got, expected = (generate_contrast(m, tokenizer, PROMPTS, max_new_tokens=5).new_tokens for m in (model, whole))
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_collect_with_a_device_map_and_disk_offload(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROMPTS))
    common = ["collect", "moelens-tiny", str(prompts), "--max-new-tokens", "3", "--no-progress"]
    placed = [*common, "--out", str(tmp_path / "offloaded"), "--device-map", json.dumps(OFFLOADED),
              "--offload-folder", str(tmp_path / "weights"), "--max-memory", '{"cpu": "4GiB"}']
    assert main(placed) == 0, capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    keys = ["prompt_id", "position", "layer", "rank"]
    got, expected = (moelens.read_trace(tmp_path / name).routes.sort_values(keys).reset_index(drop=True) for name in ("offloaded", "whole"))
    pd.testing.assert_frame_equal(got[keys + ["expert"]], expected[keys + ["expert"]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--out", str(tmp_path / "bad"), "--device-map", "{not json"])
    assert exit_info.value.code == 2 and "--device-map: not valid JSON" in capsys.readouterr().err
