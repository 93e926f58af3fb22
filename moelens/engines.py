"""Routes from serving engines (``moelens import``): the routed experts vLLM or SGLang return, as a trace store.

Both engines can return, with each completion, the experts every MoE layer's router chose for every
token the model was fed: vLLM started with ``--enable-return-routed-experts`` (offline:
``LLM(..., enable_return_routed_experts=True)``), SGLang started with ``--enable-return-routed-experts``
and asked with ``"return_routed_experts": true``. For one completion of S tokens (prompt + generated)
that is an integer array of shape ``(S - 1, L, k)``: row p holds token p's experts at each of the
model's L MoE layers (the engine numbers them 0..L-1, in layer order), k slots per layer. **Every fed
token has routes: all prompt tokens and every generated token but the last, which was sampled and
never fed back.** Expert ids are logical (the model's numbering), as the engines return them.

:func:`import_routes` writes an ordinary store (see :mod:`moelens.store`), with these particulars:

* ``routes.layer`` is the model's layer index: the engine's MoE layer j is ``moe_layers[j]``, given
  explicitly or derived from the model's ``config.json`` (:func:`moe_layers_of_config`);
* ``routes.rank`` is the engine's slot order, the order its top-k kernel wrote the experts in, which
  is not necessarily the weight order;
* ``routes.weight`` is null (engines return ids only) and the manifest says ``weights: false`` and
  names the engine (``engine``); analyses that need weights refuse such a store;
* ``tokens`` holds the fed tokens, as ``moelens collect --max-new-tokens`` stores them: the prompt,
  then the generated tokens but the last (``generated`` true); ``token`` strings only with a tokenizer;
* one sequence (``prompt_id``) per completion: the response's ``id`` field (as for ``collect``'s
  prompt files) or its 0-based number in the file, with ``/<completion index>`` appended for
  requests that returned several completions (``n > 1``).

Accepted responses (a ``.jsonl`` file of one response per line, or a ``.json`` file holding one
response or a list of them):

* vLLM offline, a ``RequestOutput`` as a dict: ``prompt_token_ids``, ``outputs[i].token_ids``,
  ``outputs[i].routed_experts`` (``CompletionOutput.routed_experts.tolist()``);
* vLLM's OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``, asked with
  ``"return_token_ids": true``): ``prompt_token_ids`` (in the choice or the response),
  ``choices[i].token_ids``, ``choices[i].routed_experts`` as base64 of a ``.npy`` array or as nested
  lists; a response-level ``prompt_routed_experts`` (vLLM 0.21) is prepended to each choice's rows;
* SGLang ``/generate``: ``output_ids`` and ``meta_info.routed_experts``, base64 of little-endian
  int32 ids. Its response does not carry the prompt's token ids: save the ids sent with it (below).

A line is either the response itself, whose fields other than the engine's become prompt tags
(columns of the ``prompts`` table, as with ``collect``'s JSONL prompt files), or a wrapper
``{"response": <response>, "id": ..., "text": ..., "input_ids": [...], <tags>...}`` in which every
field but ``response`` is the prompt's: ``id`` its id, ``text`` its text, ``input_ids`` its token ids
(used when the response has none), the rest tags. Anything that does not fit (a missing field,
routing rows other than S - 1, a layer count other than the MoE layers given, another top-k, an
expert id outside the model's experts, base64 of the wrong size) raises :class:`EngineImportError`
naming the file, line or response and what to do, before anything is written.

A live server: give its URL (``http://host:port``) and a prompt file; each prompt is sent greedily
(vLLM: ``/v1/completions`` with ``return_token_ids``; SGLang: its native ``/generate`` with
``input_ids``, since its responses carry no prompt ids) and the responses are imported as above.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moelens import store
from moelens.errors import EngineImportError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

Engine = Literal["vllm", "sglang"]
ENGINE_NAMES: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang"}

# the fields each response format defines; in a bare response every other field is a prompt tag
_FORMAT_FIELDS: dict[str, frozenset[str]] = {
    "vllm-offline": frozenset(
        {"request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs", "finished", "metrics", "lora_request",
         "encoder_prompt", "encoder_prompt_token_ids", "num_cached_tokens", "kv_transfer_params", "multi_modal_placeholders"}
    ),
    "vllm-openai": frozenset(
        {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier", "prompt_logprobs",
         "prompt_token_ids", "prompt_text", "prompt_routed_experts", "kv_transfer_params", "ec_transfer_params", "metrics"}
    ),
    "sglang": frozenset({"text", "output_ids", "meta_info", "index"}),
}
_FORMAT_ENGINES = {"vllm-offline": "vllm", "vllm-openai": "vllm", "sglang": "sglang"}
_ROUTES_HINT = {
    "vllm": "start vLLM with --enable-return-routed-experts (offline: LLM(..., enable_return_routed_experts=True))",
    "sglang": 'start SGLang with --enable-return-routed-experts and send "return_routed_experts": true with each request',
}
_WRAP_HINT = 'save the token ids sent with the response, as {"response": <response>, "input_ids": [...]}'


def import_routes(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str,
    engine: Engine | None = None,
    moe_layers: Sequence[int] | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    tokenizer: str | os.PathLike[str] | Any = None,
    engine_version: str | None = None,
    prompts: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 0,
    shard_size: int = 64,
) -> store.StoredTrace:
    """Import the routed experts of saved engine responses (or of a live server) into a new store at ``out``.

    Args:
        source: a ``.jsonl``/``.json`` file of responses (see the module docstring), or the URL of a
            running server (``http://host:port``), which is sent ``prompts``.
        model: the model's name, recorded in the manifest (for a live vLLM server: the served name).
        engine: ``"vllm"`` or ``"sglang"``; default: recognised from the responses (needed for a URL).
        moe_layers: the model's MoE layer indices, in order: the engine's MoE layer j is ``moe_layers[j]``.
            Default: derived from ``config`` (:func:`moe_layers_of_config`).
        config: the model's ``config.json`` (a path, its checkpoint directory, or the parsed dict):
            MoE layers, routed experts, top-k, decoder layers and context length.
        num_experts, top_k: override the config's (``top_k`` is otherwise read from the responses,
            except for SGLang's flat int32 ids, which need it to be reshaped).
        tokenizer: a tokenizer or its directory: token strings and special token ids in the store
            (analyses exclude special tokens only when the store records them); sent as ids to a live server.
        engine_version: recorded in the manifest (a live server is asked for it).
        prompts, max_new_tokens: for a URL only: the prompt file (as for ``moelens collect``) and the
            tokens to generate per prompt (0, as for collect: the prompt's routing only; the engine then
            samples one token, which is never fed).
        shard_size: sequences per shard.

    The whole import is validated before ``out`` is created; ``out`` must not hold a store already.
    Holds the expert ids of all sequences in memory (the smallest integer type, 1 byte per id up to 256 experts).
    """
    from moelens.collect import open_for_writing, prompts_table, with_prompt_ids

    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 (got {shard_size})")
    if engine is not None and engine not in ENGINE_NAMES:
        raise EngineImportError(f"unknown engine {engine!r}: use one of {sorted(ENGINE_NAMES)}")
    settings = model_settings(config) if config is not None else {}
    layers = _checked_layers(moe_layers if moe_layers is not None else settings.get("moe_layers"), settings.get("num_layers"))
    num_experts = num_experts or settings.get("num_experts")
    if not num_experts:
        raise EngineImportError(
            "the model's number of routed experts is unknown: pass num_experts (--num-experts, e.g. n_routed_experts "
            "or num_experts of its config.json) or its config (--config)"
        )
    tokenizer = _load_tokenizer(tokenizer)
    is_url = str(source).startswith(("http://", "https://"))
    if not is_url and (prompts is not None or max_new_tokens):
        raise EngineImportError(f"prompts and max_new_tokens are sent to a live server; {source} is a file of saved responses: leave them out")
    if is_url:
        responses, served_version = _query_server(str(source), engine, model, prompts, max_new_tokens, tokenizer)
        engine_version = engine_version or served_version
    else:
        responses = _read_responses(Path(source))
    reader = _Reader(layers, int(num_experts), top_k or settings.get("top_k"), engine)
    sequences = [sequence for number, (where, record) in enumerate(responses) for sequence in reader.sequences(where, number, record)]
    if not sequences:
        raise EngineImportError(f"{source} holds no responses: give a file of saved responses, one per line (.jsonl)")
    records = with_prompt_ids([s.prompt_record for s in sequences], str(source))
    for sequence, record in zip(sequences, records):
        sequence.prompt_record = record
    layout = store.StoreLayout(
        num_layers=settings.get("num_layers") or max(layers) + 1,
        num_experts=int(num_experts),
        top_k=reader.top_k,
        max_positions=max(settings.get("max_positions") or 0, max(s.length for s in sequences), 2),
        prompt_id_type="string" if isinstance(records[0]["prompt_id"], str) else "uint32",
    )
    manifest = _manifest(model, settings, layout, layers, reader, source, is_url, len(responses), len(sequences), tokenizer, engine_version, shard_size)
    out = Path(out)
    lock = store.WriterLock(out)
    open_for_writing(out, False, lock)
    try:
        store.write_manifest(out, manifest)
        prompt_rows = prompts_table(records, layout)  # one table, sliced per shard: the same tag columns in every shard
        for index, start in enumerate(range(0, len(sequences), shard_size)):
            chunk = sequences[start : start + shard_size]
            tables = _shard_tables(chunk, layout, layers, tokenizer)
            store.write_shard(out, index, {"prompts": prompt_rows.slice(start, len(chunk)), **tables})
        manifest.shards = store.finished_shards(out)
        store.write_manifest(out, manifest)
    finally:
        lock.release()
    events = sum(s.experts.size for s in sequences)
    logging.getLogger(__name__).info(
        f"moelens import: {len(sequences)} sequences from {len(responses)} {ENGINE_NAMES[reader.engine]} responses, "
        f"{sum(s.length - 1 for s in sequences):,} fed tokens, {events:,} routing events (expert ids, no weights) in {out}"
    )
    return store.scan_trace(out)


# --- the model's MoE layout --------------------------------------------------------------------
def model_settings(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """What a transformers ``config.json`` (a path, its checkpoint directory or the parsed dict) says of
    the routing: ``moe_layers``, ``num_experts``, ``top_k``, ``num_layers`` (decoder layers),
    ``max_positions``, ``model_type`` and ``config_hash``. Multimodal configs are read from their
    ``text_config``."""
    import hashlib

    where = "the config"
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        where = str(path)
        if not path.is_file():
            raise EngineImportError(f"config {path} does not exist: give the model's config.json or its checkpoint directory")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise EngineImportError(f"{path}: not a valid JSON config ({error})") from None
        if not isinstance(config, Mapping):
            raise EngineImportError(f"{path}: expected a JSON object (a transformers config.json)")
    text = config.get("text_config") or config
    num_layers = text.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise EngineImportError(f"{where} has no num_hidden_layers: pass the MoE layers and the number of experts instead (--moe-layers, --num-experts)")
    return {
        "moe_layers": moe_layers_of_config(text),
        "num_experts": next((text[key] for key in store.EXPERT_COUNT_KEYS if isinstance(text.get(key), int)), None),
        "top_k": text.get("num_experts_per_tok"),
        "num_layers": num_layers,
        "max_positions": text.get("max_position_embeddings"),
        "model_type": config.get("model_type"),
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }


def moe_layers_of_config(config: Mapping[str, Any]) -> list[int]:
    """The MoE layer indices of a (text) config, by the layout fields transformers' families use:

    * ``first_k_dense_replace`` (DeepSeek-V2/V3, Kimi-K2, GLM-4.5): layers from that index on, every
      ``moe_layer_freq``-th (default 1);
    * ``decoder_sparse_step`` / ``mlp_only_layers`` (Qwen2-MoE, Qwen3-MoE): every step-th layer counted
      from 1, except the listed dense ones;
    * neither: every decoder layer (Mixtral, OLMoE, GPT-OSS, ...).

    Other layouts (e.g. Llama 4's interleaving) need the layers given explicitly; a wrong derivation
    is caught on import, as a layer count that differs from the engine's.
    """
    layers = range(int(config["num_hidden_layers"]))
    if "first_k_dense_replace" in config:
        first, every = int(config["first_k_dense_replace"] or 0), int(config.get("moe_layer_freq") or 1)
        return [i for i in layers if i >= first and i % every == 0]
    if "decoder_sparse_step" in config or "mlp_only_layers" in config:
        step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or ())
        return [i for i in layers if i not in dense and (i + 1) % step == 0]
    return list(layers)


def _checked_layers(layers: Sequence[int] | None, num_layers: int | None) -> list[int]:
    if not layers:
        raise EngineImportError("the model's MoE layers are unknown: pass them (--moe-layers 1,2,...) or its config (--config path/config.json)")
    layers = [int(layer) for layer in layers]
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
        raise EngineImportError(f"MoE layers {layers}: give distinct layer indices >= 0 in increasing order (the engine's order)")
    if num_layers is not None and layers[-1] >= num_layers:
        raise EngineImportError(f"MoE layer {layers[-1]} is beyond the config's {num_layers} decoder layers (0-{num_layers - 1})")
    return layers


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if not Path(tokenizer).is_dir():
        raise EngineImportError(f"tokenizer directory {tokenizer} does not exist: give the model's checkpoint (or tokenizer) directory")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


# --- reading responses -------------------------------------------------------------------------
def _read_responses(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, response) pairs from a .jsonl (one response per line) or .json (one, or a list) file."""
    if not path.is_file():
        raise EngineImportError(f"{path} does not exist: give a .jsonl or .json file of saved engine responses, or a server URL")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise EngineImportError(f"{path}: unknown file type {suffix!r}; save responses as .jsonl (one per line) or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EngineImportError(f"{path}: not UTF-8 (byte {error.start}); save the responses as UTF-8 JSON") from None
    if suffix == ".jsonl":
        items = [(f"{path}, line {n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        responses = [(where, _parse_json(line, where)) for where, line in items]
    else:
        data = _parse_json(text, str(path))
        responses = [(f"{path}, response {i}", item) for i, item in enumerate(data)] if isinstance(data, list) else [(str(path), data)]
    for where, response in responses:
        if not isinstance(response, dict):
            raise EngineImportError(f"{where}: expected a JSON object (an engine response), got a JSON {type(response).__name__}")
    return responses


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EngineImportError(f"{where}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None


@dataclass
class _Sequence:
    """One completion: its prompt's row of the prompts table, token ids and routing."""

    prompt_record: dict[str, Any]
    prompt: np.ndarray  # [P] token ids
    generated: np.ndarray  # [G]
    experts: np.ndarray  # [P + G - 1, L, k] expert ids in the engine's slot order

    @property
    def length(self) -> int:
        return self.prompt.size + self.generated.size


class _Reader:
    """Turns responses into :class:`_Sequence` s, checking each against the model's layout."""

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int | None, engine: str | None) -> None:
        self.moe_layers, self.num_experts, self.top_k, self.engine = moe_layers, num_experts, top_k, engine
        self.formats: set[str] = set()

    def sequences(self, where: str, number: int, record: dict[str, Any]) -> list[_Sequence]:
        wrapped = isinstance(record.get("response"), dict)
        response = record["response"] if wrapped else record
        form = _format(response, where)
        engine = _FORMAT_ENGINES[form]
        if self.engine is not None and engine != self.engine:
            raise EngineImportError(
                f"{where}: a {ENGINE_NAMES[engine]} response ({form}), but the import is from {ENGINE_NAMES[self.engine]}: "
                "import each engine's responses into its own store (or fix --engine)"
            )
        self.engine = engine
        self.formats.add(form)
        meta = {k: v for k, v in record.items() if k != "response"} if wrapped else {k: v for k, v in record.items() if k not in _FORMAT_FIELDS[form]}
        base_id = meta.pop("id", number)
        sent_ids = meta.pop("input_ids", None)
        text = meta.pop("text", response.get("prompt") if form == "vllm-offline" else response.get("prompt_text"))
        parts = _completion_fields(response, form, where, sent_ids)
        sequences = []
        for index, (here, prompt, generated, routes) in enumerate(parts):
            prompt_id = f"{base_id}/{index}" if len(parts) > 1 else base_id
            sequences.append(self._sequence(here, {"id": prompt_id, "text": text, **meta}, prompt, generated, routes))
        return sequences

    def _sequence(self, where: str, prompt_record: dict[str, Any], prompt: tuple[str, Any, str], generated: tuple[str, Any, str], routes: tuple[str, Any]) -> _Sequence:
        import numpy as np

        prompt_ids, generated_ids = _token_ids(where, *prompt), _token_ids(where, *generated)
        field, value = routes
        if value is None:
            raise EngineImportError(f"{where}: no `{field}` (the routed experts): {_ROUTES_HINT[self.engine]}")
        experts = _routing_array(value, where, field, len(self.moe_layers), self.top_k)
        rows, layers, k = experts.shape
        if layers != len(self.moe_layers):
            raise EngineImportError(
                f"{where}: `{field}` has routing for {layers} MoE layers, but {len(self.moe_layers)} MoE layers were given "
                f"({self.moe_layers}): pass the model's MoE layers (--moe-layers) or the config of the model that was served (--config)"
            )
        if self.top_k is not None and k != self.top_k:
            raise EngineImportError(
                f"{where}: `{field}` has {k} experts per token and layer, but top-k is {self.top_k}: pass the served "
                "model's top-k (--top-k) or config (--config)"
            )
        self.top_k = k
        expected = prompt_ids.size + generated_ids.size - 1
        if rows != expected:
            raise EngineImportError(
                f"{where}: `{field}` has {rows} routing rows; a sequence of {prompt_ids.size} prompt + {generated_ids.size} "
                f"generated tokens has {expected} fed tokens (all but the last generated one). The response does not match its "
                "token ids: import the engine's complete, unmodified response, and ask for the routing of the whole "
                "sequence (vLLM's routed_experts_prompt_start and SGLang's routed_experts_start_len at 0)"
            )
        outside = (experts < 0) | (experts >= self.num_experts)
        if outside.any():
            position, layer, slot = (int(i) for i in np.argwhere(outside)[0])
            raise EngineImportError(
                f"{where}: expert id {int(experts[position, layer, slot])} at token {position}, MoE layer {layer} "
                f"(model layer {self.moe_layers[layer]}), slot {slot} is outside the model's {self.num_experts} routed experts "
                f"(0-{self.num_experts - 1}): pass the served model's number of experts (--num-experts) or config (--config)"
            )
        # the smallest type that holds every id: the whole import stays in memory until it is written
        experts = experts.astype(np.min_scalar_type(self.num_experts - 1))
        return _Sequence(prompt_record, prompt_ids, generated_ids, experts)


def _format(response: dict[str, Any], where: str) -> str:
    for key, form in (("outputs", "vllm-offline"), ("choices", "vllm-openai"), ("meta_info", "sglang")):
        if key in response:
            return form
    raise EngineImportError(
        f"{where}: not a vLLM or SGLang response: expected `outputs` (vLLM RequestOutput), `choices` (vLLM OpenAI-compatible "
        f"response) or `meta_info` (SGLang /generate), found {sorted(response)[:12]}"
    )


def _completion_fields(response: dict[str, Any], form: str, where: str, sent_ids: Any) -> list[tuple[str, tuple, tuple, tuple]]:
    """Per completion: (where, (prompt ids field, value, hint), (generated ids ...), (routes field, value))."""
    if form == "sglang":
        meta_info = response["meta_info"] if isinstance(response["meta_info"], dict) else {}
        prompt = ("input_ids", sent_ids, f"SGLang's /generate response carries no prompt token ids: {_WRAP_HINT}")
        generated = ("output_ids", response.get("output_ids"), "save SGLang's whole /generate response")
        return [(where, prompt, generated, ("meta_info.routed_experts", meta_info.get("routed_experts")))]
    key = "outputs" if form == "vllm-offline" else "choices"
    items = response[key]
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise EngineImportError(f"{where}: `{key}` must be a non-empty list of completions (JSON objects)")
    parts = []
    for index, item in enumerate(items):
        here = f"{where}, {key}[{index}]"
        if form == "vllm-offline":
            prompt = ("prompt_token_ids", response.get("prompt_token_ids", sent_ids), f"save RequestOutput.prompt_token_ids, or {_WRAP_HINT}")
            generated = ("token_ids", item.get("token_ids"), "save CompletionOutput.token_ids")
            routes = item.get("routed_experts")
        else:
            asked = 'send "return_token_ids": true with the request'
            prompt_ids = next((ids for ids in (item.get("prompt_token_ids"), response.get("prompt_token_ids"), sent_ids) if ids is not None), None)
            prompt = ("prompt_token_ids", prompt_ids, f"{asked}, or {_WRAP_HINT}")
            generated = ("token_ids", item.get("token_ids"), asked)
            routes = item.get("routed_experts")
            if isinstance(routes, list) and isinstance(response.get("prompt_routed_experts"), list):
                routes = response["prompt_routed_experts"] + routes  # vLLM 0.21 returns the prompt's rows once per response
        parts.append((here, prompt, generated, ("routed_experts", routes)))
    return parts


def _token_ids(where: str, field: str, value: Any, hint: str) -> np.ndarray:
    import numpy as np

    if value is None:
        raise EngineImportError(f"{where}: no `{field}` (token ids): {hint}")
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise EngineImportError(f"{where}: `{field}` must be a list of token ids (integers >= 0)")
    return np.asarray(value, dtype=np.int64)


def _routing_array(value: Any, where: str, field: str, layers: int, top_k: int | None) -> np.ndarray:
    """The routed experts as an integer array [tokens, layers, k], from nested lists (vLLM offline,
    OpenAI-compatible 0.21), base64 of a .npy array (vLLM's server) or of raw int32 (SGLang)."""
    import base64
    import binascii
    import io

    import numpy as np

    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise EngineImportError(f"{where}: `{field}` is a string but not base64: save the engine's response unmodified") from None
        if raw.startswith(b"\x93NUMPY"):
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        else:
            if top_k is None:
                raise EngineImportError(f"{where}: `{field}` holds flat int32 ids: give the model's top-k (--top-k or --config) to read them")
            width = 4 * layers * top_k
            if len(raw) % width:
                raise EngineImportError(
                    f"{where}: `{field}` decodes to {len(raw)} bytes, not a whole number of tokens of {layers} MoE layers x "
                    f"top-{top_k} int32 ids ({width} bytes per token): the MoE layers or top-k given are not the served model's"
                )
            array = np.frombuffer(raw, dtype="<i4").reshape(-1, layers, top_k)
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            array = np.asarray([])  # ragged nested lists: reported below as not [tokens][layers][top-k]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise EngineImportError(
            f"{where}: `{field}` is not a [tokens][MoE layers][top-k] array of expert ids (got shape {array.shape}, "
            f"{array.dtype}): save the engine's response unmodified"
        )
    return array


# --- writing -----------------------------------------------------------------------------------
def _shard_tables(sequences: list[_Sequence], layout: store.StoreLayout, moe_layers: list[int], tokenizer: Any) -> dict[str, pa.Table]:
    """The routes and tokens tables of ``sequences``: one route per (fed token, MoE layer, slot)."""
    import numpy as np
    import pyarrow as pa

    layer_ids = np.asarray(moe_layers, dtype=np.int64)
    width, k = layer_ids.size * layout.top_k, layout.top_k
    routes: dict[str, list[np.ndarray]] = {name: [] for name in ("prompt_id", "position", "layer", "rank", "expert")}
    tokens: dict[str, list[np.ndarray]] = {name: [] for name in ("prompt_id", "position", "token_id", "generated")}
    for sequence in sequences:
        fed = np.concatenate([sequence.prompt, sequence.generated])[:-1]  # the last token was never fed
        positions = np.arange(fed.size)
        prompt_id = sequence.prompt_record["prompt_id"]
        routes["prompt_id"].append(np.full(fed.size * width, prompt_id))
        routes["position"].append(np.repeat(positions, width))
        routes["layer"].append(np.tile(np.repeat(layer_ids, k), fed.size))
        routes["rank"].append(np.tile(np.arange(k), fed.size * layer_ids.size))
        routes["expert"].append(sequence.experts.reshape(-1))
        tokens["prompt_id"].append(np.full(fed.size, prompt_id))
        tokens["position"].append(positions)
        tokens["token_id"].append(fed)
        tokens["generated"].append(positions >= sequence.prompt.size)
    route_columns = {name: np.concatenate(parts) for name, parts in routes.items()}
    token_columns = {name: np.concatenate(parts) for name, parts in tokens.items()}
    ids = token_columns["token_id"].tolist()
    token_columns["token"] = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [None] * len(ids)
    return {
        "tokens": pa.Table.from_pydict(token_columns, schema=layout.tokens_schema()),
        "routes": store.routes_table(layout, {**route_columns, "weight": pa.nulls(route_columns["expert"].size, pa.float16())}),
    }


def _manifest(
    model: str, settings: dict[str, Any], layout: store.StoreLayout, layers: list[int], reader: _Reader, source: Any,
    is_url: bool, responses: int, sequences: int, tokenizer: Any, engine_version: str | None, shard_size: int,
) -> store.Manifest:
    import hashlib
    from importlib.metadata import version

    import moelens

    given = {"moe_layers": layers, "num_experts": layout.num_experts, "top_k": layout.top_k}
    source_sha = None if is_url else hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return store.Manifest(
        model=str(model),
        config_hash=settings.get("config_hash") or hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest(),
        family=str(settings.get("model_type") or "unknown"),
        layout=layout,
        moe_layers=layers,
        moelens_version=moelens.__version__,
        transformers_version=version("transformers"),
        collection={"source": str(source), "source_sha256": source_sha, "responses": responses, "sequences": sequences, "shard_size": shard_size},
        special_token_ids=store.special_token_ids_of(tokenizer) if tokenizer is not None else [],
        weights=False,
        engine={"name": ENGINE_NAMES[reader.engine], "version": engine_version, "formats": sorted(reader.formats)},
    )


# --- a live server -----------------------------------------------------------------------------
def _query_server(
    url: str, engine: Engine | None, model: str, prompts: Any, max_new_tokens: int, tokenizer: Any
) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """Send every prompt of ``prompts`` to the server (greedy, one at a time); the responses as
    wrapped records, and the server's version (``GET /version``; None if it does not say).

    Tested against a stand-in vLLM server, not a real engine (that needs a GPU); the requests follow
    the engines' documentation: vLLM ``/v1/completions`` (``return_token_ids``; the server must run with
    ``--enable-return-routed-experts``), SGLang ``/generate`` (``input_ids``, ``return_routed_experts``).
    """
    from moelens.collect import read_prompts

    if engine is None:
        raise EngineImportError(f"importing from {url} needs the engine that serves it: pass engine (--engine vllm or sglang)")
    if prompts is None:
        raise EngineImportError(f"importing from {url} sends prompts: pass a prompt file (--prompts, as for `moelens collect`)")
    if engine == "sglang" and tokenizer is None:
        raise EngineImportError(f"SGLang's /generate returns no prompt token ids: pass the model's tokenizer (--tokenizer DIR) so that moelens sends ids")
    base = url.rstrip("/")
    new_tokens = max(max_new_tokens, 1)  # an engine samples at least one token; the last one is never fed
    responses = []
    for prompt in read_prompts(prompts):
        prompt_id, text = prompt.pop("prompt_id"), prompt.pop("text")
        ids = list(tokenizer(text)["input_ids"]) if tokenizer is not None else None
        if engine == "vllm":
            body = {"model": model, "prompt": ids or text, "max_tokens": new_tokens, "temperature": 0, "return_token_ids": True}
            response = _http_json(f"{base}/v1/completions", body)
        else:
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0}, "return_routed_experts": True}
            response = _http_json(f"{base}/generate", body)
        sent = {"input_ids": ids} if ids is not None else {}
        responses.append((f"{url}, prompt {prompt_id!r}", {"response": response, "id": prompt_id, "text": text, **sent, **prompt}))
    try:
        served = _http_json(f"{base}/version")
    except EngineImportError:
        served = None
    return responses, served.get("version") if isinstance(served, dict) else None


def _http_json(url: str, body: Any = None) -> Any:
    """GET (or POST ``body`` as JSON to) ``url``; its JSON answer."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        detail = error.read()[:400].decode(errors="replace")
        raise EngineImportError(f"{url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise EngineImportError(f"cannot reach {url} ({getattr(error, 'reason', error)}): start the server or check the URL") from None
    except ValueError:
        raise EngineImportError(f"{url} did not answer JSON: is it a vLLM or SGLang server?") from None
