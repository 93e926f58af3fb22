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
from moelens.store import StoreError

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


# --- one writer per store, faults ------------------------------------------------------------
def _collect_process(prompts: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moelens.cli", "collect", MODEL, str(prompts), "--out", str(out),
               "--batch-size", "2", "--shard-size", "4", "--no-progress", *extra]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def test_two_writers_started_together_never_lose_prompts(tmp_path):
    """The issue's case: two runs, different prompt files, one --out, started at the same moment."""
    files = {name: _write_jsonl(tmp_path / f"{name}.jsonl", [{"id": f"{name}{i}", **r} for i, r in enumerate(_prompts(24))])
             for name in ("a", "b")}
    runs = {name: _collect_process(path, tmp_path / "s") for name, path in files.items()}
    results = {name: (run.wait(), run.stderr.read()) for name, run in runs.items()}
    winners = [name for name, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    code, err = results[loser]
    assert code == 2 and ("being written by another moelens process (pid" in err or "already holds a trace store" in err), err
    prompts = moelens.read_trace(tmp_path / "s").prompts["prompt_id"]
    assert sorted(prompts) == sorted(f"{winners[0]}{i}" for i in range(24))


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    first = _write_jsonl(tmp_path / "a.jsonl", _prompts(40))
    running = _collect_process(first, tmp_path / "s")
    lock = tmp_path / "s" / "writer.lock"
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text()):
        assert running.poll() is None and time.monotonic() < deadline, running.stderr.read()
        time.sleep(0.02)
    second = _write_jsonl(tmp_path / "b.jsonl", [{"text": "another file"}])
    code, err = _run(["collect", MODEL, str(second), "--out", str(tmp_path / "s"), "--resume", "--no-progress"], capsys)
    assert code == 2 and f"being written by another moelens process (pid {running.pid} on host" in err
    assert running.wait() == 0, running.stderr.read()
    assert sorted(moelens.read_trace(tmp_path / "s").prompts["prompt_id"]) == list(range(40))
    assert lock.read_text() == ""  # released


def test_stale_lock_of_a_killed_writer_is_taken_over(tmp_path):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(40))
    killed = _collect_process(prompts, tmp_path / "s")
    deadline = time.monotonic() + 300
    while not (tmp_path / "s" / "shards" / "shard-000001.json").exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert f'"pid": {killed.pid}' in (tmp_path / "s" / "writer.lock").read_text()  # left behind by the kill
    resumed = _collect_process(prompts, tmp_path / "s", "--resume")
    assert resumed.wait() == 0
    err = resumed.stderr.read()
    assert f"took over the lock of {tmp_path / 's'}: its holder (pid {killed.pid} on host" in err
    assert sorted(moelens.read_trace(tmp_path / "s").prompts["prompt_id"]) == list(range(40))


def test_resume_with_a_changed_prompt_file_is_refused(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(3))
    args = ["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--no-progress"]
    assert _run(args, capsys)[0] == 0
    _write_jsonl(prompts, _prompts(4))
    code, err = _run([*args, "--resume"], capsys)
    assert code == 2 and "differ from those the store was started with" in err and "3 prompts" in err
    assert len(moelens.read_trace(tmp_path / "s").prompts) == 3


def test_a_store_directory_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """Read-only --out (simulated: the tests may run as root, whom file modes do not stop)."""
    import errno

    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(2))
    (tmp_path / "s").mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "s")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, err = _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and f"cannot write to --out {tmp_path / 's'}: Permission denied. Choose a writable directory." in err


def test_disk_full_during_a_shard_write_loses_nothing_and_resume_completes(tmp_path, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(6))
    args = ["collect", MODEL, str(prompts), "--shard-size", "2", "--no-progress"]
    assert _run([*args, "--out", str(tmp_path / "clean")], capsys)[0] == 0
    real_write = pq.write_table

    def fills_the_disk(table, where, **kwargs):
        if "shard-000001" in str(where) and "routes" in str(where):
            Path(where).write_bytes(b"PAR1 half a file")  # what a full disk leaves: a partial temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", fills_the_disk)
    code, err = _run([*args, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "writing shard-000001" in err and "No space left on device" in err and "--resume" in err
    store_dir = tmp_path / "s"
    assert (store_dir / "shards" / "shard-000000.json").exists() and not (store_dir / "shards" / "shard-000001.json").exists()
    assert not list(store_dir.rglob("*.tmp")) and not (store_dir / "routes" / "shard-000001.parquet").exists()
    assert json.loads((store_dir / "manifest.json").read_text())["family"] == "qwen2_moe"
    monkeypatch.setattr(pq, "write_table", real_write)
    code, err = _run([*args, "--out", str(store_dir), "--resume"], capsys)
    assert code == 0, err
    pd.testing.assert_frame_equal(_routes_of(store_dir), _routes_of(tmp_path / "clean"))


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"first prompt\nsecond caf\xc3\xa9 ok\nthird \xff bad\n")  # valid UTF-8 until line 3
    code, err = _run(["collect", MODEL, str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and "p.txt, line 3, column 7: not UTF-8 (byte 0xff)" in err and "save the file as UTF-8" in err


def test_a_corrupt_manifest_is_named(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(2))
    assert _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--no-progress"], capsys)[0] == 0
    (tmp_path / "s" / "manifest.json").write_text('{"schema_version": 1, "model": ')
    with pytest.raises(StoreError, match=r"manifest.json is corrupt \(Expecting value.*restore manifest.json from a copy"):
        moelens.read_trace(tmp_path / "s")


def test_a_truncated_shard_is_named_on_first_query(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", _prompts(6))
    assert _run(["collect", MODEL, str(prompts), "--out", str(tmp_path / "s"), "--shard-size", "2", "--no-progress"], capsys)[0] == 0
    victim = tmp_path / "s" / "routes" / "shard-000002.parquet"
    victim.write_bytes(victim.read_bytes()[:200])
    stored = moelens.read_trace(tmp_path / "s")
    expected = r"1 finished shard\(s\) are damaged, e.g. shard-000002: routes/shard-000002.parquet unreadable.*collect \.\.\. --resume"
    with pytest.raises(StoreError, match=expected):
        stored.sql("SELECT count(*) FROM routes")
    with pytest.raises(StoreError, match=expected):
        stored.routes


def test_resume_accepts_a_manifest_whose_spec_is_in_the_older_words(tmp_path):
    """A store collected under an intervention by an older moelens records the spec in version-1
    words (no "version", "only_layers", ranks from 1); resuming with the same spec must go on."""
    from moelens.collect import CollectOptions, collect
    from moelens.interventions import rank

    prompts = tmp_path / "p.txt"
    prompts.write_text("one two three\nfour five six\nseven eight\n")
    spec = rank(1, layers=[1])  # each token's second choice at layer 1
    collect(MODEL, prompts, tmp_path / "s", CollectOptions(progress=False, shard_size=2), intervention=spec)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    part = manifest["intervention"]["interventions"][0]
    manifest["intervention"] = {"interventions": [{"kind": "rank", "rank": part["rank"] + 1, "only_layers": part["layers"], "tokens": part["tokens"]}]}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    # the last shard is "lost": resume must accept the old manifest and collect it again
    last = sorted((tmp_path / "s" / "shards").glob("shard-*.json"))[-1]
    last.unlink()
    store = collect(MODEL, prompts, tmp_path / "s", CollectOptions(progress=False, shard_size=2, resume=True), intervention=spec)
    assert sorted(store.prompts["prompt_id"].tolist()) == [0, 1, 2]
    with pytest.raises(Exception, match="intervention"):
        collect(MODEL, prompts, tmp_path / "s", CollectOptions(progress=False, shard_size=2, resume=True), intervention=rank(2, layers=[1]))
