"""``moelens import``: routed experts from vLLM / SGLang responses, built by hand from the engines'
documented contracts, checked against the expert ids planted in them."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moelens
from moelens.analysis import stats
from moelens.cli import main
from moelens.engines import EngineImportError, import_routes, moe_layers_of_config
from moelens.store import StoreError

# a toy DeepSeek-style model: layer 0 dense, layers 1 and 2 MoE, top-2 of 8 routed experts
CONFIG = {"model_type": "deepseek_v3", "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "max_position_embeddings": 64}
MOE_LAYERS = [1, 2]
EXPERTS, TOP_K, PROMPT_LEN, NEW_TOKENS = 8, 2, 5, 3
ROWS = PROMPT_LEN + NEW_TOKENS - 1  # every token but the last generated one was fed
DOMAINS = ["code", "prose"]


def planted_experts(seed: int) -> np.ndarray:
    """[ROWS, MoE layers, top-k] distinct expert ids per token and layer, in a made-up slot order."""
    rng = np.random.default_rng(seed)
    return np.array([[rng.permutation(EXPERTS)[:TOP_K] for _ in MOE_LAYERS] for _ in range(ROWS)])


PLANTED = [planted_experts(seed) for seed in range(len(DOMAINS))]
PROMPT_IDS = [[100 + 10 * i + p for p in range(PROMPT_LEN)] for i in range(len(DOMAINS))]
GENERATED_IDS = [[200 + 10 * i + g for g in range(NEW_TOKENS)] for i in range(len(DOMAINS))]


def vllm_offline_lines() -> list[dict]:
    """RequestOutput-like dicts as a user saves them (routed_experts via .tolist()), with a tag."""
    return [
        {
            "request_id": str(i),
            "prompt": f"prompt {i}",
            "prompt_token_ids": PROMPT_IDS[i],
            "outputs": [{"index": 0, "text": "...", "token_ids": GENERATED_IDS[i], "routed_experts": PLANTED[i].tolist(), "finish_reason": "length"}],
            "finished": True,
            "domain": DOMAINS[i],
        }
        for i in range(len(DOMAINS))
    ]


def sglang_records() -> list[dict]:
    """SGLang /generate responses (meta_info.routed_experts: base64 of int32) saved with the ids sent."""
    return [
        {
            "response": {
                "text": "...",
                "output_ids": GENERATED_IDS[i],
                "meta_info": {"id": f"req-{i}", "prompt_tokens": PROMPT_LEN, "completion_tokens": NEW_TOKENS,
                              "routed_experts": base64.b64encode(PLANTED[i].astype("<i4").tobytes()).decode(),
                              "finish_reason": {"type": "length", "length": NEW_TOKENS}},
            },
            "id": 10 + i,
            "text": f"prompt {i}",
            "input_ids": PROMPT_IDS[i],
            "domain": DOMAINS[i],
        }
        for i in range(len(DOMAINS))
    ]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture
def vllm_store(tmp_path: Path, config_path: Path) -> moelens.store.StoredTrace:
    source = write_jsonl(tmp_path / "vllm.jsonl", vllm_offline_lines())
    return import_routes(source, tmp_path / "vllm-store", model="toy-moe", config=config_path, engine_version="0.11.0")


def expected_routes(prompt_ids: list) -> list[tuple]:
    """(prompt_id, position, layer, rank, expert) straight from the planted arrays."""
    return [
        (pid, position, MOE_LAYERS[j], rank, int(PLANTED[i][position, j, rank]))
        for i, pid in enumerate(prompt_ids)
        for position in range(ROWS)
        for j in range(len(MOE_LAYERS))
        for rank in range(TOP_K)
    ]


def stored_routes(trace: moelens.store.StoredTrace) -> list[tuple]:
    frame = trace.sql("SELECT prompt_id, position, layer, rank, expert FROM routes ORDER BY ALL")
    return [tuple(row) for row in frame.itertuples(index=False)]


def test_vllm_jsonl_routes_equal_the_planted_ids(vllm_store):
    assert stored_routes(vllm_store) == expected_routes([0, 1])
    assert vllm_store.sql("SELECT count(*) AS n FROM routes WHERE weight IS NOT NULL")["n"][0] == 0
    assert vllm_store.routes["weight"].isna().all()  # the null float16 column reads back through pandas too
    manifest = vllm_store.manifest
    assert (manifest.weights, manifest.engine["name"], manifest.engine["version"]) == (False, "vLLM", "0.11.0")
    assert manifest.moe_layers == MOE_LAYERS and manifest.family == "deepseek_v3"
    assert (manifest.layout.num_layers, manifest.layout.num_experts, manifest.layout.top_k) == (3, EXPERTS, TOP_K)


def test_tokens_are_the_fed_tokens_with_the_generated_flag(vllm_store):
    tokens = vllm_store.sql("SELECT prompt_id, position, token_id, generated FROM tokens ORDER BY ALL")
    expected = [
        (i, position, (PROMPT_IDS[i] + GENERATED_IDS[i])[position], position >= PROMPT_LEN)
        for i in range(len(DOMAINS))
        for position in range(ROWS)
    ]
    assert [tuple(row) for row in tokens.itertuples(index=False)] == expected
    prompts = vllm_store.prompts.sort_values("prompt_id")
    assert prompts["domain"].tolist() == DOMAINS and prompts["text"].tolist() == ["prompt 0", "prompt 1"]


def test_sglang_base64_routes_equal_the_planted_ids(tmp_path, config_path):
    source = tmp_path / "sglang.json"
    source.write_text(json.dumps(sglang_records()))
    trace = import_routes(source, tmp_path / "store", model="toy-moe", config=config_path)
    assert stored_routes(trace) == expected_routes([10, 11])
    assert trace.manifest.engine == {"name": "SGLang", "version": None, "formats": ["sglang"]}
    assert trace.prompts.sort_values("prompt_id")["domain"].tolist() == DOMAINS


def test_several_completions_of_one_request_are_separate_sequences(tmp_path, config_path):
    line = vllm_offline_lines()[0]
    second = {**line["outputs"][0], "index": 1, "token_ids": GENERATED_IDS[1], "routed_experts": PLANTED[1].tolist()}
    line["outputs"].append(second)
    trace = import_routes(write_jsonl(tmp_path / "n2.jsonl", [line]), tmp_path / "store", model="toy-moe", config=config_path)
    counts = trace.sql("SELECT prompt_id, count(*) AS n FROM routes GROUP BY ALL ORDER BY ALL")
    assert counts["prompt_id"].tolist() == ["0/0", "0/1"] and set(counts["n"]) == {ROWS * len(MOE_LAYERS) * TOP_K}


def test_analyze_stats_load_equals_a_hand_count(vllm_store, tmp_path, capsys):
    assert main(["analyze", "stats", str(vllm_store.root), "--out", str(tmp_path / "stats")]) == 0
    assert "token_entropy skipped" in capsys.readouterr().err
    frequency = pd.read_csv(tmp_path / "stats" / "frequency.csv")
    hand = Counter((MOE_LAYERS[j], int(e)) for experts in PLANTED for row in experts for j, chosen in enumerate(row) for e in chosen)
    assert {(l, e): n for l, e, n in frequency[["layer", "expert", "selections"]].itertuples(index=False) if n} == hand
    assert len(frequency) == len(MOE_LAYERS) * EXPERTS
    assert (tmp_path / "stats" / "coactivation.csv").exists() and (tmp_path / "stats" / "load_balance.csv").exists()
    assert not (tmp_path / "stats" / "token_entropy.csv").exists()


def test_ftri_runs_on_the_imported_tags(vllm_store, tmp_path):
    out = tmp_path / "ftri"
    assert main(["analyze", "ftri", str(vllm_store.root), "--out", str(out), "--tag", "domain", "--target", "code", "--permutations", "0"]) == 0
    table = pd.read_csv(out / "ftri.csv")
    # fTRI counts the prompt's tokens: the code prompt's rate of (layer, expert) over its 5 prompt positions
    code = Counter((MOE_LAYERS[j], int(e)) for row in PLANTED[0][:PROMPT_LEN] for j, chosen in enumerate(row) for e in chosen)
    rates = {(l, e): rate for l, e, rate in table[["layer", "expert", "target_rate"]].itertuples(index=False)}
    assert rates == {(l, e): code[(l, e)] / PROMPT_LEN for l in MOE_LAYERS for e in range(EXPERTS)}


def test_an_analysis_that_needs_weights_refuses_clearly(vllm_store):
    with pytest.raises(StoreError, match="this store was imported from vLLM and holds expert ids only; token_entropy needs routing weights"):
        stats.token_entropy(vllm_store)


def test_the_cli_imports_with_explicit_moe_layers(tmp_path, capsys):
    source = write_jsonl(tmp_path / "vllm.jsonl", vllm_offline_lines())
    code = main(["import", str(source), "--out", str(tmp_path / "store"), "--engine", "vllm", "--model", "toy-moe",
                 "--moe-layers", "1-2", "--num-experts", "8"])
    assert code == 0 and "2 sequences from 2 vLLM responses" in capsys.readouterr().err
    assert stored_routes(moelens.read_trace(tmp_path / "store")) == expected_routes([0, 1])
    code = main(["import", str(source), "--out", str(tmp_path / "other"), "--engine", "sglang", "--model", "toy-moe", "--moe-layers", "1,2", "--num-experts", "8"])
    assert code == 2 and "line 1: a vLLM response (vllm-offline), but the import is from SGLang" in capsys.readouterr().err


def _drop_row(line: dict) -> None:
    line["outputs"][0]["routed_experts"].pop()


def _out_of_range(line: dict) -> None:
    line["outputs"][0]["routed_experts"][3][1][0] = EXPERTS


BAD_VLLM = {
    "rows-not-sequence-minus-one": (_drop_row, {}, r"line 2, outputs\[0\]: `routed_experts` has 6 routing rows; a sequence of 5 prompt \+ 3 generated tokens has 7 fed tokens"),
    "layer-count": (None, {"moe_layers": [0, 1, 2]}, r"line 1, outputs\[0\]: `routed_experts` has routing for 2 MoE layers, but 3 MoE layers were given \(\[0, 1, 2\]\): pass"),
    "expert-out-of-range": (_out_of_range, {}, r"line 2, outputs\[0\]: expert id 8 at token 3, MoE layer 1 \(model layer 2\), slot 0 is outside the model's 8 routed experts"),
    "top-k": (None, {"top_k": 3}, r"line 1, outputs\[0\]: `routed_experts` has 2 experts per token and layer, but top-k is 3"),
    "missing-prompt-ids": (lambda line: line.pop("prompt_token_ids"), {}, r"line 2, outputs\[0\]: no `prompt_token_ids` \(token ids\): save RequestOutput.prompt_token_ids"),
    "missing-routes": (lambda line: line["outputs"][0].pop("routed_experts"), {}, r"line 2, outputs\[0\]: no `routed_experts`.*--enable-return-routed-experts"),
    "ragged-routes": (lambda line: line["outputs"][0]["routed_experts"][0].pop(), {}, r"line 2, outputs\[0\]: `routed_experts` is not a \[tokens\]\[MoE layers\]\[top-k\] array"),
}


@pytest.mark.parametrize("spoil, options, message", BAD_VLLM.values(), ids=BAD_VLLM.keys())
def test_a_bad_vllm_payload_is_refused_before_anything_is_written(tmp_path, config_path, spoil, options, message):
    lines = vllm_offline_lines()
    if spoil is not None:
        spoil(lines[1])
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(EngineImportError, match=message):
        import_routes(source, tmp_path / "store", model="toy-moe", config=config_path, **options)
    assert not (tmp_path / "store").exists()


def _truncated_base64(record: dict) -> None:
    meta = record["response"]["meta_info"]
    meta["routed_experts"] = base64.b64encode(base64.b64decode(meta["routed_experts"])[:-4]).decode()


BAD_SGLANG = {
    "base64-of-wrong-size": (_truncated_base64, r"sglang.json, response 1: `meta_info.routed_experts` decodes to 108 bytes, not a whole number of tokens of 2 MoE layers x top-2 int32 ids"),
    "no-prompt-ids": (lambda record: record.pop("input_ids"), r"sglang.json, response 1: no `input_ids` \(token ids\): SGLang's /generate response carries no prompt token ids"),
    "not-base64": (lambda record: record["response"]["meta_info"].update(routed_experts="not base64!"), r"response 1: `meta_info.routed_experts` is a string but not base64"),
}


@pytest.mark.parametrize("spoil, message", BAD_SGLANG.values(), ids=BAD_SGLANG.keys())
def test_a_bad_sglang_payload_is_refused(tmp_path, config_path, spoil, message):
    records = sglang_records()
    spoil(records[1])
    source = tmp_path / "sglang.json"
    source.write_text(json.dumps(records))
    with pytest.raises(EngineImportError, match=message):
        import_routes(source, tmp_path / "store", model="toy-moe", config=config_path)
    assert not (tmp_path / "store").exists()


def test_unreadable_inputs_say_where_and_what_to_do(tmp_path, config_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(vllm_offline_lines()[0]) + "\n{not json\n")
    with pytest.raises(EngineImportError, match=r"broken.jsonl, line 2: not valid JSON"):
        import_routes(broken, tmp_path / "a", model="toy-moe", config=config_path)
    other = write_jsonl(tmp_path / "other.jsonl", [{"generated_text": "hi"}])
    with pytest.raises(EngineImportError, match=r"other.jsonl, line 1: not a vLLM or SGLang response: expected `outputs`"):
        import_routes(other, tmp_path / "b", model="toy-moe", config=config_path)
    with pytest.raises(EngineImportError, match=r"MoE layers are unknown: pass them \(--moe-layers"):
        import_routes(broken, tmp_path / "c", model="toy-moe")


@pytest.mark.parametrize(
    "config, layers",
    [
        ({"num_hidden_layers": 5, "first_k_dense_replace": 2, "moe_layer_freq": 1}, [2, 3, 4]),  # DeepSeek-V3
        ({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1, 5]),  # Qwen2-MoE
        ({"num_hidden_layers": 3}, [0, 1, 2]),  # Mixtral, OLMoE: every layer
    ],
    ids=["first-k-dense", "sparse-step", "every-layer"],
)
def test_moe_layers_are_derived_from_the_config(config, layers):
    assert moe_layers_of_config(config) == layers


class _FakeVllmServer(BaseHTTPRequestHandler):
    """A vLLM OpenAI-compatible server in miniature: /v1/completions with routed_experts as base64 .npy."""

    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        i = int(body["prompt"].split()[-1])
        npy = io.BytesIO()
        np.save(npy, PLANTED[i].astype(np.int16))
        choice = {"index": 0, "text": "...", "prompt_token_ids": PROMPT_IDS[i], "token_ids": GENERATED_IDS[i],
                  "routed_experts": base64.b64encode(npy.getvalue()).decode(), "finish_reason": "length"}
        self._reply({"id": f"cmpl-{i}", "object": "text_completion", "model": body["model"], "choices": [choice]})

    def do_GET(self) -> None:  # noqa: N802
        self._reply({"version": "0.0-fake"})

    def _reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


def test_a_live_openai_compatible_server_is_queried_and_imported(tmp_path, config_path):
    server = HTTPServer(("127.0.0.1", 0), _FakeVllmServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"text": f"prompt {i}", "domain": d} for i, d in enumerate(DOMAINS)])
    try:
        trace = import_routes(f"http://127.0.0.1:{server.server_port}", tmp_path / "store", model="toy-moe", engine="vllm",
                              config=config_path, prompts=prompts, max_new_tokens=NEW_TOKENS)
    finally:
        server.shutdown()
    assert stored_routes(trace) == expected_routes([0, 1])
    assert trace.manifest.engine["version"] == "0.0-fake" and trace.prompts.sort_values("prompt_id")["domain"].tolist() == DOMAINS
    assert all(body["max_tokens"] == NEW_TOKENS and body["return_token_ids"] and body["temperature"] == 0 for body in _FakeVllmServer.bodies)


_ENGINE = next((name for name in ("vllm", "sglang") if importlib.util.find_spec(name) is not None), None)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_ENGINE != "vllm" or not _cuda(), reason="needs vLLM and a CUDA GPU (SGLang's offline engine is not covered)")
def test_vllm_routes_of_moelens_tiny_import_and_match_its_routing(tmp_path):
    """A real engine: vLLM runs moelens-tiny (a Qwen3-MoE) and its routes import. vLLM's kernels are not
    moelens' eager forward, so the prompt tokens' expert sets must agree on most (token, layer), not all."""
    import torch
    from vllm import LLM, SamplingParams

    from moelens.loading import save_zoo_model

    checkpoint = save_zoo_model("moelens-tiny", tmp_path / "moelens-tiny")
    llm = LLM(str(checkpoint), enable_return_routed_experts=True, max_model_len=256, dtype="float32")
    outputs = llm.generate(["def add(a, b):\n    return a + b", "The river flows to the sea."], SamplingParams(max_tokens=4, temperature=0))
    saved = [{"prompt_token_ids": list(o.prompt_token_ids),
              "outputs": [{"token_ids": list(c.token_ids), "routed_experts": np.asarray(c.routed_experts).tolist()} for c in o.outputs]}
             for o in outputs]
    trace = import_routes(write_jsonl(tmp_path / "vllm.jsonl", saved), tmp_path / "store", model="moelens-tiny",
                          config=checkpoint, tokenizer=checkpoint)
    model, _ = moelens.load(str(checkpoint), dtype="float32")
    agree = total = 0
    for prompt_id, output in enumerate(outputs):
        with torch.no_grad(), moelens.trace(model) as tracer:
            model(torch.tensor([list(output.prompt_token_ids)]))
        ours = tracer.routes.groupby(["position", "layer"])["expert"].apply(frozenset)
        imported = trace.routes.query(f"prompt_id == {prompt_id} and position < {len(output.prompt_token_ids)}")
        theirs = imported.groupby(["position", "layer"])["expert"].apply(frozenset)
        agree += int((ours == theirs.reindex(ours.index)).sum())
        total += len(ours)
    assert total and agree / total > 0.8, (agree, total)
