"""One trace protocol: an in-memory trace run over tagged prompts and a store collected from a
prompt file give the same tables and the same analyses.

Ground truth for the in-memory path is the store path: ``moelens collect`` by model name from a
JSONL file (its own model load, file parsing, Parquet shards, DuckDB views over the files). The tags
are also checked against the lists they came from, and selection counts against a pandas count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moelens
from moelens import analysis
from moelens.collect import CollectOptions, collect
from moelens.errors import CollectError, PromptFileError

MODEL = "moelens-tiny"
PROBES = Path(__file__).resolve().parents[1] / "data" / "probes" / "domains.jsonl"


def _probe_records(per_domain: int = 4, domains: tuple[str, ...] = ("python", "en", "de")) -> list[dict]:
    """The first ``per_domain`` probes of each domain, interleaved (text and domain only)."""
    by_domain: dict[str, list[dict]] = {d: [] for d in domains}
    for line in PROBES.read_text().splitlines():
        record = json.loads(line)
        if record["domain"] in by_domain and len(by_domain[record["domain"]]) < per_domain:
            by_domain[record["domain"]].append({"text": record["text"], "domain": record["domain"]})
    return [by_domain[d][i] for i in range(per_domain) for d in domains]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _frames_equal(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert len(expected) > 0
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    assert got.attrs == expected.attrs


@pytest.fixture(scope="module")
def tiny_model():
    return moelens.load(MODEL)


@pytest.mark.parametrize("max_new_tokens", [0, 3])
def test_in_memory_trace_with_tags_equals_the_collected_store(tiny_model, tmp_path, max_new_tokens):
    model, tokenizer = tiny_model
    records = _probe_records()
    texts, domains = [r["text"] for r in records], [r["domain"] for r in records]
    trace = moelens.trace(model, prompts=texts, tags={"domain": domains}, tokenizer=tokenizer, batch_size=4, max_new_tokens=max_new_tokens)
    store = collect(MODEL, _write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "s",
                    CollectOptions(batch_size=4, max_new_tokens=max_new_tokens, progress=False))
    assert isinstance(trace, moelens.Trace) and isinstance(store, moelens.Trace)
    assert (trace.layers, trace.experts, trace.special_token_ids) == (store.layers, store.experts, store.special_token_ids)

    # the tags reach the prompts table, one per prompt, in the given order
    assert trace.prompts["prompt_id"].tolist() == list(range(len(records)))
    assert trace.prompts["domain"].tolist() == domains and trace.prompts["text"].tolist() == texts
    tables, stored = trace.to_pandas(), store.to_pandas()
    assert sorted(tables) == sorted(stored) == ["prompts", "routes", "tokens"]
    for name in ("prompts", "tokens", "routes"):
        keys = [k for k in ("prompt_id", "position", "layer", "rank") if k in tables[name]]
        _frames_equal(tables[name].sort_values(keys), stored[name].sort_values(keys))
    assert tables["tokens"]["generated"].any() == (max_new_tokens > 0)

    # selection counts by hand (pandas over the routes and prompts) agree with expert_frequency
    joined = tables["routes"].merge(tables["prompts"], on="prompt_id").astype({"layer": "int64", "expert": "int64"})
    by_hand = joined.groupby(["domain", "layer", "expert"]).size().rename("selections").reset_index()
    frequency = analysis.expert_frequency(trace, ["domain"], tokens=analysis.TokenFilter(special=True))
    counted = frequency.loc[frequency["selections"] > 0, ["domain", "layer", "expert", "selections"]]
    assert len(by_hand) > 0
    pd.testing.assert_frame_equal(counted.reset_index(drop=True), by_hand, check_dtype=False)

    # every analysis gives the same table on either kind of trace
    results = {
        "ftri": lambda t: analysis.ftri_scores(t, tag="domain", target="python", permutations=200, seed=1),
        "npmi_tag": lambda t: analysis.npmi_scores(t, where={"domain": "de"}, min_count=1),
        "npmi_regex": lambda t: analysis.npmi_scores(t, regex="^[0-9]", min_count=1),
        "frequency": lambda t: analysis.expert_frequency(t, ["domain", "position_class"]),
        "load_balance": lambda t: analysis.load_balance(t, ["domain"]),
        "entropy": lambda t: analysis.token_entropy(t, ["domain"]),
        "coactivation": lambda t: analysis.coactivation(t),
        "transitions": lambda t: analysis.transitions(t, ["domain"]),
    }
    for name, run in results.items():
        got, expected = run(trace), run(store)
        assert len(expected) > 0, name
        _frames_equal(got, expected)
    assert analysis.routing_stability(trace, store)["changed_tokens"].sum() == 0


def test_prompt_records_carry_ids_and_tags_and_refuse_bad_input(tiny_model):
    model, tokenizer = tiny_model
    records = [{"id": "a", "text": "def f(x):", "lang": "py"}, {"id": "b", "text": "Die Datei wird", "lang": "de"}]
    trace = moelens.trace(model, prompts=records, tags={"split": ["train", "test"]}, tokenizer=tokenizer)
    prompts = trace.prompts
    assert prompts.columns.tolist() == ["prompt_id", "text", "lang", "split"]
    assert prompts.values.tolist() == [["a", "def f(x):", "py", "train"], ["b", "Die Datei wird", "de", "test"]]
    assert sorted(set(trace.tokens["prompt_id"])) == ["a", "b"]
    with pytest.raises(PromptFileError, match="tag 'split' has 1 values for 2 prompts"):
        moelens.trace(model, prompts=["x", "y"], tags={"split": ["train"]}, tokenizer=tokenizer)
    with pytest.raises(PromptFileError, match="tag 'lang' is both a field"):
        moelens.trace(model, prompts=records, tags={"lang": ["py", "de"]}, tokenizer=tokenizer)
    with pytest.raises(PromptFileError, match="prompt 1: the prompt is empty"):
        moelens.trace(model, prompts=["x", "  "], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass tokenizer="):
        moelens.trace(model, prompts=["x"])
    with pytest.raises(ValueError, match="pass the prompts too"):
        moelens.trace(model, tags={"split": ["train"]})
    with pytest.raises(moelens.TraceError, match="has finished recording"):
        with trace:
            pass


def test_a_with_block_trace_lists_its_prompts_without_tags(tiny_model):
    model, tokenizer = tiny_model
    with torch.no_grad(), moelens.trace(model, tokenizer=tokenizer) as trace:
        model(**tokenizer(["def f(x):", "Bonjour"], return_tensors="pt", padding=True))
        model(**tokenizer(["12 + 30 ="], return_tensors="pt"))
    prompts = trace.prompts
    assert prompts["prompt_id"].tolist() == [0, 1, 2] and prompts["text"].isna().all()
    assert sorted(set(trace.routes["prompt_id"])) == [0, 1, 2]
    with pytest.raises(ValueError, match="it has no prompt tags"):
        analysis.ftri_scores(trace, tag="domain", target="python")


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_given_back_unchanged(tiny_model):
    model, tokenizer = tiny_model
    texts = ["def add(a, b):\n    return a + b", "Hallo"]
    padded = moelens.trace(model, prompts=texts, tokenizer=tokenizer)
    bare = moelens.load(MODEL)[1]
    bare.pad_token = None
    trace = moelens.trace(model, prompts=texts, tokenizer=bare)
    assert bare.pad_token is None
    assert len(padded.routes) > 0
    pd.testing.assert_frame_equal(trace.routes, padded.routes)  # padding never reaches the recorded tokens


def test_collect_takes_a_model_object_and_records(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    records = _probe_records(per_domain=2)
    options = CollectOptions(batch_size=3, shard_size=4, progress=False)
    from_objects = collect(model, records, tmp_path / "objects", options, tokenizer=tokenizer)
    from_file = collect(MODEL, _write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "file", options)
    assert from_objects.shards == from_file.shards == ["shard-000000", "shard-000001"]
    for name in ("prompts", "tokens", "routes"):
        _frames_equal(getattr(from_objects, name), getattr(from_file, name))
    assert from_objects.manifest.config_hash == from_file.manifest.config_hash
    assert from_objects.manifest.collection["prompts_sha"] == from_file.manifest.collection["prompts_sha"]
    with pytest.raises(CollectError, match="needs its tokenizer"):
        collect(model, records, tmp_path / "x", options)
    with pytest.raises(CollectError, match=r"\['dtype'\] apply when collect loads the model by name"):
        collect(model, records, tmp_path / "y", CollectOptions(dtype="float32", progress=False), tokenizer=tokenizer)
    with pytest.raises(CollectError, match="drop tokenizer="):
        collect(MODEL, records, tmp_path / "z", options, tokenizer=tokenizer)
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))  # refused before anything was written


def test_scan_trace_is_lazy_and_read_trace_is_its_alias(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    records = _probe_records(per_domain=1)
    collect(model, records, tmp_path / "s", CollectOptions(progress=False), tokenizer=tokenizer)
    store = moelens.scan_trace(tmp_path / "s")
    events = int(store.sql("SELECT count(*) AS n FROM routes")["n"][0])
    assert events > 0 and not {"routes", "tokens", "prompts"} & set(vars(store))  # queried, nothing read into memory
    frames = store.to_pandas()
    assert len(frames["routes"]) == events and vars(store)["routes"] is frames["routes"]
    again = moelens.read_trace(tmp_path / "s")
    assert type(again) is type(store)
    pd.testing.assert_frame_equal(again.routes, frames["routes"])
    np.testing.assert_array_equal(again.prompts["domain"], [r["domain"] for r in records])


def test_a_tag_only_later_prompts_carry_is_kept(tmp_path):
    """The prompts table takes its columns from every record, not only the first (and every shard
    of a store gets the same columns)."""
    import moelens
    from moelens.collect import CollectOptions, collect

    model, tokenizer = moelens.load("tiny:qwen3_moe")
    records = [{"text": "a b"}, {"text": "c d", "domain": "x"}, {"text": "e f"}]
    traced = moelens.trace(model, prompts=records, tokenizer=tokenizer)
    stored = collect(model, records, tmp_path / "s", CollectOptions(progress=False, shard_size=1), tokenizer=tokenizer)
    for trace in (traced, stored):
        domains = trace.prompts.sort_values("prompt_id")["domain"]  # nulls reach pandas as NaN
        assert domains.isna().tolist() == [True, False, True] and domains.iloc[1] == "x"
