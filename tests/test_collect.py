"""``moelens collect`` end to end: formats, ids, crash safety (a real SIGKILL), torchrun, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import moelens
from moelens.cli import main

MODEL = "tiny:qwen2_moe"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prompts(n: int) -> list[dict]:
    domains = ["en", "code", "arith"]
    texts = {"en": "The river flows past the old mill number {i}", "code": "def f{i}(x):\n    return x * {i}", "arith": "{i} + {i} = "}
    return [{"text": texts[domains[i % 3]].format(i=i), "domain": domains[i % 3]} for i in range(n)]


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_every_prompt_format_gives_the_same_routes(tmp_path, fmt, capsys):
    records = _prompts(5)
    frame = pd.DataFrame(records)
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        path.write_text("".join(r["text"].replace("\n", " ") + "\n" for r in records))
    elif fmt == "jsonl":
        _write_jsonl(path, [{**r, "text": r["text"].replace("\n", " ")} for r in records])
    elif fmt == "csv":
        frame.assign(text=frame.text.str.replace("\n", " ")).to_csv(path, index=False)
    else:
        frame.assign(text=frame.text.str.replace("\n", " ")).to_parquet(path)
    code, _ = _run([ "collect", MODEL, str(path), "--out", str(tmp_path / "store"), "--batch-size", "2", "--no-progress"], capsys)
    assert code == 0
    store = moelens.read_trace(tmp_path / "store")
    assert sorted(store.prompts["prompt_id"]) == list(range(5))
    if fmt != "txt":
        assert set(store.prompts["domain"]) == {"en", "code", "arith"}
    # the same prompts traced directly give the same routes
    model, tokenizer = moelens.load(MODEL)
    import torch

    with torch.no_grad(), moelens.trace(model) as direct:
        model(**tokenizer([r["text"].replace("\n", " ") for r in records], return_tensors="pt", padding=True))
    keys = ["prompt_id", "position", "layer", "rank"]
    got = store.routes.astype({"prompt_id": "int64"}).sort_values(keys).reset_index(drop=True)
    expected = direct.routes.astype({"prompt_id": "int64"}).sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[keys + ["expert"]], expected[keys + ["expert"]])


def test_generation_ids_tags_manifest_and_sql(tmp_path, capsys):
    records = [{"id": f"q{i}", **r} for i, r in enumerate(_prompts(4))]
    path = _write_jsonl(tmp_path / "p.jsonl", records)
    code, err = _run(["collect", MODEL, str(path), "--out", str(tmp_path / "s"), "--max-new-tokens", "3", "--full-logits", "--shard-size", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert "routing events" in err and "bytes/event" in err
    store = moelens.read_trace(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["shards"] == ["shard-000000", "shard-000001"]
    assert manifest["family"] == "qwen2_moe" and manifest["moe_layers"] == [1, 2]
    assert manifest["layout"]["num_experts"] == 8 and manifest["collection"]["max_new_tokens"] == 3
    generated = store.sql("SELECT prompt_id, sum(generated::INT) AS g FROM tokens GROUP BY 1 ORDER BY 1")
    assert generated["prompt_id"].tolist() == ["q0", "q1", "q2", "q3"] and (generated["g"] == 2).all()
    per_domain = store.sql("SELECT p.domain, count(*) AS n FROM routes r JOIN prompts p USING (prompt_id) GROUP BY 1")
    assert set(per_domain["domain"]) == {"en", "code", "arith"}
    assert len(store.logits) == len(store.tokens) * 2  # one row per token and MoE layer


def _routes_of(root: Path) -> pd.DataFrame:
    keys = ["prompt_id", "position", "layer", "rank"]
    return moelens.read_trace(root).routes.sort_values(keys).reset_index(drop=True)


def test_sigkill_then_resume_writes_every_row_exactly_once(tmp_path):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(48))
    common = [sys.executable, "-m", "moelens.cli", "collect", MODEL, str(prompts), "--batch-size", "2", "--shard-size", "4", "--no-progress"]
    clean = subprocess.run([*common, "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([*common, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "shards" / "shard-000002.json").exists():
        assert process.poll() is None, f"collect ended before it could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((out / "shards").glob("*.json")))
    assert 3 <= finished < 12, "the kill must land mid-run"
    resumed = subprocess.run([*common, "--out", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    got, expected = _routes_of(out), _routes_of(tmp_path / "clean")
    assert not got.duplicated(["prompt_id", "position", "layer", "rank"]).any()
    pd.testing.assert_frame_equal(got, expected)


def test_resume_repairs_a_corrupt_shard(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(6))
    args = ["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--shard-size", "2", "--no-progress"]
    assert _run(args, capsys)[0] == 0
    expected = _routes_of(tmp_path / "s")
    victim = tmp_path / "s" / "routes" / "shard-000001.parquet"
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated file, as after a disk error
    code, err = _run([*args, "--resume"], capsys)
    assert code == 0
    assert "corrupt shard shard-000001" in err and "quarantine" in err
    assert (tmp_path / "s" / "quarantine" / "routes" / "shard-000001.parquet").exists()  # kept, not deleted
    pd.testing.assert_frame_equal(_routes_of(tmp_path / "s"), expected)


def test_resume_into_a_store_of_another_model_is_refused(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(2))
    assert _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--no-progress"], capsys)[0] == 0
    code, err = _run(["collect", "tiny:olmoe", str(prompts), "--out", str(tmp_path / "s"), "--resume", "--no-progress"], capsys)
    assert code == 2 and "recorded from model 'tiny:qwen2_moe'" in err and "new --out" in err


@pytest.mark.slow
def test_torchrun_two_ranks_read_as_one_store(tmp_path):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(10))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "moelens.cli",
               "collect", MODEL, str(prompts), "--out", str(tmp_path / "dist"), "--shard-size", "3", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "moelens.cli", "collect", MODEL, str(prompts), "--out", str(tmp_path / "one"), "--shard-size", "3", "--no-progress"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert manifest["shards"] == [f"shard-00000{i}" for i in range(4)]
    pd.testing.assert_frame_equal(_routes_of(tmp_path / "dist"), _routes_of(tmp_path / "one"))


# --- bad input: each case names what was wrong, where, and what to do --------------------------
@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        pytest.param(lambda d: _write_jsonl(d / "p.jsonl", [{"text": "ok"}]), ["--model", str(Path("/nonexistent/model"))], "is not a model: no directory", id="path-not-a-model"),
        pytest.param(lambda d: (d / "p.jsonl").write_text('{"text": "a"}\n{"text": "b"\n'), [], "line 2: not valid JSON", id="malformed-jsonl-line"),
        pytest.param(lambda d: (d / "p.jsonl").write_text(""), [], "holds no prompts", id="empty-prompt-file"),
        pytest.param(lambda d: (d / "p.jsonl").write_text('{"text": "a"}\n{"text": "   "}\n'), [], "line 2: the prompt is empty", id="empty-prompt"),
        pytest.param(lambda d: (d / "p.jsonl").write_text('{"txt": "a"}\n'), [], "line 1: no `text` field", id="missing-text-field"),
        pytest.param(lambda d: (d / "p.jsonl").write_text('{"text": "' + "x" * 600 + '"}\n'), [], "longer than the model's context allows: prompt 0 has 601 tokens, the limit is 512", id="prompt-longer-than-context"),
        pytest.param(lambda d: (d / "p.jsonl").write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n'), [], "prompt id 1 appears more than once", id="duplicate-ids"),
    ],
)
def test_bad_input(tmp_path, capsys, setup, extra, message):
    setup(tmp_path)
    model = extra[1] if extra[:1] == ["--model"] else MODEL
    code, err = _run(["collect", model, str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_out_below_a_file_is_unwritable(tmp_path, capsys):
    _write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}])
    (tmp_path / "file").write_text("not a directory")
    code, err = _run(["collect", MODEL, str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "file" / "store"), "--no-progress"], capsys)
    assert code == 2 and "cannot write to --out" in err and "writable directory" in err


def test_existing_store_without_resume_is_refused_and_untouched(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(2))
    args = ["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--no-progress"]
    assert _run(args, capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    code, err = _run(args, capsys)
    assert code == 2 and "already holds a trace store" in err and "--resume" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == before


def test_batch_size_zero_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", MODEL, "p.jsonl", "--out", str(tmp_path), "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size: must be a whole number of at least 1 (got 0)" in capsys.readouterr().err


def test_truncate_keeps_the_beginning(tmp_path, capsys):
    _write_jsonl(tmp_path / "p.jsonl", [{"text": "y" * 600}])
    code, err = _run(["collect", MODEL, str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s"), "--truncate", "--no-progress"], capsys)
    assert code == 0 and "truncated to their first 512 tokens" in err
    assert moelens.read_trace(tmp_path / "s").tokens["position"].max() == 511


def test_intervention_is_applied_and_recorded(tmp_path, capsys):
    from moelens.interventions import disable

    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(4))
    spec = disable({1: [0, 1, 2]})
    (tmp_path / "spec.json").write_text(spec.to_json())
    code, err = _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--intervention", str(tmp_path / "spec.json"), "--no-progress"], capsys)
    assert code == 0, err
    store = moelens.read_trace(tmp_path / "s")
    assert store.manifest.intervention == spec.to_dict()
    assert not store.routes.query("layer == 1")["expert"].isin([0, 1, 2]).any()
    assert store.routes.query("layer == 2")["expert"].isin([0, 1, 2]).any()
    (tmp_path / "bad.json").write_text('{"interventions": [{"kind": "disable", "experts": {"0": [1]}}]}')
    code, err = _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s2"), "--intervention", str(tmp_path / "bad.json"), "--no-progress"], capsys)
    assert code == 2 and "layer 0 is dense" in err and not (tmp_path / "s2" / "manifest.json").exists()
