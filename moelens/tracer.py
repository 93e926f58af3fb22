"""The routing tracer: record what every MoE router of a model returned, token by token.

``with moelens.trace(model) as tr: model(**batch)`` (or ``model.generate(...)``) records, for
every real (non-padding) token and every MoE layer, the experts the router chose and the weights
the model used, read from what the experts module received (never re-derived). A tracer is an
observer of the model's :mod:`observation sites <moelens.hooks.sites>`, which own the hooks:

* the decoder stack: one *step* per forward call, carrying the token bookkeeping (which rows are
  padding, positions, whether the tokens are generated);
* each MoE layer's experts module: the ``top_k_index`` and ``top_k_weights`` it is called with,
  i.e. the routing the model used, after everything the family's block (and any active
  intervention) did to the router's output: exact for every family, whatever its router returns.
  Where the experts take none (Llama 4), the router's dense score matrix;
* each MoE layer's router: its logits (for ``full_logits``, rank keys and the NaN check).

At the end of every step its routing is condensed on the device (indices, weights, rank keys, a
NaN flag per layer; the full logits only with ``full_logits``) and the router logits are let go.
Condensed steps stay on the device until the block ends, then move to the host at once, unless
they pass ``max_device_bytes``: then the oldest move to (pinned) host memory during the block,
asynchronously, so device memory stays flat however long the generation.
A step in which a router or experts module that should have fired did not raises
:class:`TraceError`, so a replaced or compiled forward cannot silently record nothing.

A :class:`Tracer` is a :class:`moelens.store.Trace` (the protocol every analysis takes; see
:mod:`moelens.store`). Its Arrow tables are built on first access, not when the block ends: the
block itself only moves the condensed steps to the host and checks them for NaN, so a notebook's
traced forward costs little more than a bare one. ``moelens.trace(model, prompts=[...])`` runs
the forward passes itself (through :func:`moelens.collect.trace_records`, as ``collect`` does)
and returns the finished trace, its ``prompts`` table carrying the prompts' tags.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moelens.errors import TraceError
from moelens.hooks import routing_check
from moelens.hooks.adapters import MoeLayer, filled_slots, moe_layers, moe_view, null_class_as_empty
from moelens.hooks.sites import RoutingObserver, sites_of
from moelens.hooks.steps import StepTokens
from moelens.store import StoreLayout, Trace, special_token_ids_of, widen_half_floats

if TYPE_CHECKING:
    import duckdb

    from moelens.hooks.routing_check import RouterReading
    from moelens.kernels.routing import RoutingRule
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import torch
    from torch import nn


DEFAULT_MAX_DEVICE_BYTES = 256 * 2**20  # condensed routing data kept on accelerators before moving to the host


@dataclass
class _Step:
    """One forward call of the decoder stack while it runs (tensors on the model's devices)."""

    prompt_ids: list[Any]  # one per batch row
    tokens: StepTokens
    # layer -> (router logits [T, E], experts' index [T, k], weights [T, k])
    routing: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _Recorded:
    """A finished step, condensed: ``tensors`` on the device until moved to the host."""

    prompt_ids: list[Any]
    generated: bool
    tensors: dict[str, torch.Tensor]
    device_bytes: int  # of ``tensors`` still on an accelerator


@dataclass
class _Session:
    """A run of forward calls over the same rows: a prefill and the decode steps that follow it."""

    prompt_ids: list[Any]
    batch_size: int
    ended: torch.Tensor | None = None  # [B] bool on the model's device: rows whose end token was fed


class Tracer(Trace, RoutingObserver):
    """Context manager recording routing decisions: an in-memory :class:`~moelens.store.Trace`;
    see :func:`moelens.trace`.

    After the ``with`` block, ``.routes``, ``.tokens``, ``.prompts`` (and ``.logits`` with
    ``full_logits``) are pandas DataFrames in the store schema, ``.arrow(name)`` gives the Arrow
    tables (built on first access) and ``.sql()`` queries them with DuckDB. ``prompts`` holds one
    row per prompt id the block met, in order: the ``records`` given (``prompt_id``, ``text``,
    tags), or without them ``prompt_id`` and a null ``text``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        full_logits: bool = False,
        prompt_ids: Sequence[Any] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
        layout: StoreLayout | None = None,
        end_token_ids: Collection[int] | None = None,
        max_device_bytes: int | None = DEFAULT_MAX_DEVICE_BYTES,
    ) -> None:
        if records is not None:
            if prompt_ids is not None:
                raise ValueError("give the prompt ids either as prompt_ids or as the records' prompt_id, not both")
            prompt_ids = [record["prompt_id"] for record in records]
        self.model = model
        self.max_device_bytes = max_device_bytes
        self.device_bytes = 0  # condensed routing data currently held on accelerators
        self.peak_device_bytes = 0
        self._end_token_ids = _end_token_ids(model, tokenizer, end_token_ids)
        self._layout = layout
        self.tokenizer = tokenizer
        self._special_token_ids = special_token_ids_of(tokenizer)
        self.full_logits = full_logits
        self._moe_layers: list[MoeLayer] = moe_layers(model)
        self._layer_ids = [layer.index for layer in self._moe_layers]
        # the index of an empty slot in the condensed steps (the tables leave it out)
        self._empty_slot = max(layer.num_experts for layer in self._moe_layers)
        self._ranking = _ranking(model, self._moe_layers)
        self._records = list(records) if records is not None else None
        self._prompt_ids: Iterator[Any] | None = iter(prompt_ids) if prompt_ids is not None else None
        self._next_prompt_index = 0
        self._seen_prompt_ids: list[Any] = []  # in the order the block met them
        self._steps: list[_Recorded] = []
        self._finished = False  # the block ended without error: the steps are on the host and checked
        self._cuda_devices: set[torch.device] = set()  # where recorded steps were condensed
        self._on_device = 0  # index of the oldest recorded step whose tensors are still on the device
        self._session: _Session | None = None
        self._current: _Step | None = None
        self._observation: AbstractContextManager[None] | None = None  # attached to the model's sites
        self._tables: dict[str, pa.Table] | None = None
        self._connection: duckdb.DuckDBPyConnection | None = None

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        if self._observation is not None:
            raise TraceError("this tracer is already active; nested `with` on the same tracer is not supported")
        if self._finished:
            raise TraceError(
                "this trace has finished recording (its `with` block ended, or trace() ran the prompts it was given); "
                "read it as it is, or call moelens.trace(model) again for a new `with` block"
            )
        observation = sites_of(self.model).observing(self)
        observation.__enter__()
        self._observation = observation
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        observation, self._observation, self._current = self._observation, None, None
        if observation is not None:
            observation.__exit__(None, None, None)
        if exc_type is not None:
            return
        if not self._steps:
            raise TraceError(
                "no forward pass of the traced model ran inside the `with moelens.trace(...)` block; "
                "call the same model object (or its generate()) inside the block."
            )
        self._finish()

    # --- observer ----------------------------------------------------------------------------
    def begin_step(self, tokens: StepTokens) -> None:
        batch = tokens.real.shape[0]
        if not tokens.generated or self._session is None or self._session.batch_size != batch:
            self._session = _Session([self._take_prompt_id() for _ in range(batch)], batch)
            self._seen_prompt_ids += self._session.prompt_ids
        if self._end_token_ids is not None:
            if self._end_token_ids.device != tokens.real.device:  # copied once, not at every step (a blocking copy)
                self._end_token_ids = self._end_token_ids.to(tokens.real.device)
            tokens, self._session.ended = tokens.end_rows(self._session.ended, self._end_token_ids)
        self._current = _Step(prompt_ids=self._session.prompt_ids, tokens=tokens)

    def _take_prompt_id(self) -> Any:
        if self._prompt_ids is None:
            self._next_prompt_index += 1
            return self._next_prompt_index - 1
        try:
            return next(self._prompt_ids)
        except StopIteration:
            raise TraceError("the traced model saw more prompts than the prompt_ids given to trace()") from None

    def routed(self, layer: MoeLayer, logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        step = self._current
        if step is None:  # the layer ran outside the decoder stack's forward (a block called directly)
            return
        step.routing[layer.index] = (logits.detach(), index.detach(), weights.detach())

    def end_step(self, completed: bool) -> None:
        step, self._current = self._current, None
        if step is None or not completed:  # a forward that raised recorded a partial step: drop it
            return
        missing = [i for i in self._layer_ids if i not in step.routing]
        if missing:
            raise TraceError(
                f"the routers or experts of MoE layers {missing} did not fire during a forward pass of "
                f"{type(self.model).__name__}. Their block's forward was probably replaced (a hub kernel, "
                "a fused MoE implementation) or the model was compiled. Trace the uncompiled eager model "
                "(e.g. load with use_kernels=False) so moelens can read the routers' outputs."
            )
        recorded = self._condense(step)
        self._steps.append(recorded)
        self.device_bytes += recorded.device_bytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        while self.max_device_bytes is not None and self.device_bytes > self.max_device_bytes and self._on_device < len(self._steps):
            self._move_to_host(self._steps[self._on_device])
            self._on_device += 1

    def _condense(self, step: _Step) -> _Recorded:
        """The step's routing stacked over layers (device ops only); the router logits are let go."""
        import torch

        layer_ids = self._layer_ids
        home = step.tokens.real.device  # layers may sit on several devices (device_map): stack on one
        if home.type == "cuda":
            self._cuda_devices.add(home)

        def here(t: torch.Tensor) -> torch.Tensor:
            return t if t.device == home else t.to(home, non_blocking=True)

        # per layer: (logits, weights as float32, indices)
        outs = [
            (here(logits), here(weights).float(), here(null_class_as_empty(logits, index, weights, layer.num_experts, self._empty_slot)))
            for layer, (logits, index, weights) in zip(self._moe_layers, (step.routing[i] for i in layer_ids))
        ]
        # an intervention may give some layers fewer slots (top_k or rank on chosen layers): pad them
        # with empty slots (index E, weight 0, ranked last), which the tables leave out
        slots = max(o[2].shape[-1] for o in outs)

        def padded(t: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, slots - t.shape[-1]), value=value) if t.shape[-1] < slots else t

        tensors = {
            "indices": torch.stack([padded(o[2], self._empty_slot) for o in outs]),  # [L, B*S, k]
            "weights": torch.stack([padded(o[1], 0.0) for o in outs]),  # [L, B*S, k]
            "rank_key": torch.stack([padded(self._rank_key(i, o), float("-inf")) for i, o in zip(layer_ids, outs)]),  # [L, B*S, k]
            "nan": torch.stack([o[0].isnan().any() for o in outs]),  # [L]
            "positions": step.tokens.positions,
            "real": step.tokens.real,
        }
        if step.tokens.input_ids is not None:
            tensors["input_ids"] = step.tokens.input_ids
        if self.full_logits:
            tensors["logits"] = torch.stack([o[0].float() for o in outs])  # [L, B*S, E]
        held = sum(t.numel() * t.element_size() for t in tensors.values() if _on_accelerator(t))
        return _Recorded(step.prompt_ids, step.tokens.generated, tensors, held)

    def _move_to_host(self, recorded: _Recorded) -> None:
        recorded.tensors = {name: _to_host(t) for name, t in recorded.tensors.items()}
        self.device_bytes -= recorded.device_bytes
        recorded.device_bytes = 0

    # --- host side ---------------------------------------------------------------------------
    def _finish(self) -> None:
        """Move all steps to the host at once and check them for NaN logits (the tables are built
        on first access, by :meth:`arrow`)."""
        import torch

        for step in self._steps[self._on_device :]:
            self._move_to_host(step)
        self._on_device = len(self._steps)
        for device in self._cuda_devices:
            torch.cuda.synchronize(device)  # every device copies came from (budget moves too), not only the current one
        nan = torch.stack([step.tensors["nan"] for step in self._steps]).any(dim=0)  # [L]
        if nan.any():
            layer = self._moe_layers[int(nan.nonzero()[0, 0])].index
            raise TraceError(
                f"router logits of MoE layer {layer} contain NaN: the model's activations "
                "overflowed or its weights are corrupt (check the dtype: float16 often overflows; try "
                "bfloat16 or float32). Nothing was recorded."
            )
        self._finished = True

    def _rank_key(self, layer_index: int, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[T, k] the score by which the family chooses each slot's expert; rank 0 is the highest.

        One definition of rank for traces and for ``rank(r)``: the family's choice order. It is the
        weight order, except where the weights are not monotone in the choice scores: a
        score-correction bias steers the choice but not the weights (DeepSeek-V3: choice =
        sigmoid(logit) + bias), or a per-expert scale multiplies the weights after the choice
        (Gemma 4). There it is the verified rule's choice score, computed from the logits.
        """
        from moelens.kernels.routing import choice_scores

        logits, weights, indices = output
        if layer_index not in self._ranking:
            return weights
        rule, reading, bias = self._ranking[layer_index]
        safe = indices.clamp(max=logits.shape[-1] - 1)  # the empty-slot sentinel E has no score
        return choice_scores(reading.kernel_logits(logits), rule, bias.to(logits.device) if bias is not None else None).gather(-1, safe)

    def layout(self) -> StoreLayout:
        """The column types of the tables: the one given to :func:`trace`, or derived from the
        model and the first prompt id (string ids give string columns)."""
        if self._layout is not None:
            return self._layout
        first_id = self._seen_prompt_ids[0] if self._seen_prompt_ids else 0
        layout = store_layout(self.model, self._moe_layers, prompt_id_type="string" if isinstance(first_id, str) else "uint32")
        if self._seen_prompt_ids:  # before the first prompt the id type is a guess: do not keep it
            self._layout = layout
        return layout

    # --- results -----------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self._layer_ids)

    @property
    def experts(self) -> int:
        return self.layout().num_experts

    @property
    def special_token_ids(self) -> list[int]:
        return list(self._special_token_ids)

    def table_names(self) -> list[str]:
        return list(self.tables())

    def arrow(self, name: str) -> pa.Table:
        """The Arrow table ``name`` (``routes``, ``tokens``, ``prompts``, ``logits``)."""
        if name not in self.tables():
            raise AttributeError(f"this trace has no {name!r} table (full_logits={self.full_logits})")
        assert self._tables is not None
        return self._tables[name]

    def tables(self) -> dict[str, pa.Table]:
        """Every table as Arrow, built on the first call (then the condensed steps are let go)."""
        if self._tables is None:
            if not self._finished:
                raise TraceError("the trace can be read only after its `with` block has ended without error")
            self._tables = _build_tables(self)
            self._steps = []
        return dict(self._tables)

    def _load(self, name: str) -> pd.DataFrame:
        return widen_half_floats(self.arrow(name)).to_pandas()

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        import duckdb

        if self._connection is None:
            connection = duckdb.connect()
            for name, table in self.tables().items():
                connection.register(name, widen_half_floats(table))
            self._connection = connection
        return self._connection


def _on_accelerator(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu"


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host: a non-blocking copy into pinned memory from CUDA (the copy overlaps
    the next forward pass; the stream orders it before any reuse of the source)."""
    import torch

    if not _on_accelerator(tensor):
        return tensor
    if tensor.device.type != "cuda":
        return tensor.to("cpu")
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return pinned.copy_(tensor, non_blocking=True)


def _build_tables(tracer: Tracer) -> dict[str, pa.Table]:
    """The store tables of a finished tracer's steps (on the host)."""
    import numpy as np
    import pyarrow as pa

    layout = tracer.layout()
    layer_ids = np.asarray(tracer.layers)
    routes: dict[str, list[np.ndarray]] = {k: [] for k in ("prompt_id", "position", "layer", "rank", "expert", "weight")}
    tokens: dict[str, list[np.ndarray]] = {k: [] for k in ("prompt_id", "position", "token_id", "generated")}
    logits_rows: dict[str, list[np.ndarray]] = {k: [] for k in ("prompt_id", "position", "layer", "logits")}
    num_layers = len(layer_ids)
    for step in tracer._steps:
        data = step.tensors
        real = data["real"].numpy().reshape(-1)  # [B*S]
        batch, new = data["real"].shape
        row_ids = np.repeat(np.asarray(step.prompt_ids), new)[real]  # [M] integer or string ids
        positions = data["positions"].numpy().reshape(-1)[real]  # [M]
        indices = data["indices"].numpy()[:, real]  # [L, M, k]
        weights = data["weights"].numpy()[:, real]  # [L, M, k]
        # rank 0 = the family's first choice (see Tracer._rank_key); sorted=False top-k (DeepSeek) needs the reorder
        order = np.argsort(-data["rank_key"].numpy()[:, real], axis=-1, kind="stable")
        indices = np.take_along_axis(indices, order, axis=-1).transpose(1, 0, 2)  # [M, L, k]
        weights = np.take_along_axis(weights, order, axis=-1).transpose(1, 0, 2)  # [M, L, k]
        tokens_m, _, k = indices.shape
        keep = filled_slots(indices, weights, layout.num_experts).reshape(-1)
        routes["prompt_id"].append(np.repeat(row_ids, num_layers * k)[keep])
        routes["position"].append(np.repeat(positions, num_layers * k)[keep])
        routes["layer"].append(np.tile(np.repeat(layer_ids, k), tokens_m)[keep])
        routes["rank"].append(np.tile(np.arange(k), tokens_m * num_layers)[keep])
        routes["expert"].append(indices.reshape(-1)[keep])
        routes["weight"].append(weights.reshape(-1)[keep])
        tokens["prompt_id"].append(row_ids)
        tokens["position"].append(positions)
        token_ids = data["input_ids"].numpy().reshape(-1)[real] if "input_ids" in data else np.zeros(tokens_m, np.int64)
        tokens["token_id"].append(token_ids)
        tokens["generated"].append(np.full(tokens_m, step.generated))
        if "logits" in data:
            logits = data["logits"].numpy()[:, real].transpose(1, 0, 2)  # [M, L, E]
            logits_rows["prompt_id"].append(np.repeat(row_ids, num_layers))
            logits_rows["position"].append(np.repeat(positions, num_layers))
            logits_rows["layer"].append(np.tile(layer_ids, tokens_m))
            logits_rows["logits"].append(logits.reshape(-1, logits.shape[-1]))

    def joined(columns: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in columns.items()}

    route_cols = joined(routes)
    token_cols = joined(tokens)
    token_strings = (
        tracer.tokenizer.convert_ids_to_tokens(token_cols["token_id"].tolist()) if tracer.tokenizer is not None else None
    )
    tables = {
        "routes": _sorted_table(route_cols, layout.routes_schema(), ("prompt_id", "position", "layer", "rank")),
        "tokens": _sorted_table(
            {**token_cols, "token": np.asarray(token_strings if token_strings else [None] * len(token_cols["token_id"]), dtype=object)},
            layout.tokens_schema(),
            ("prompt_id", "position"),
        ),
    }
    if logits_rows["logits"]:
        cols = joined(logits_rows)
        matrix = cols.pop("logits").astype(np.float16)
        cols["logits"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        tables["logits"] = _sorted_table(cols, layout.logits_schema(), ("prompt_id", "position", "layer"))
    tables["prompts"] = _prompts_table(tracer, layout)
    return {name: tables[name] for name in ("prompts", "tokens", "routes", "logits") if name in tables}


def _prompts_table(tracer: Tracer, layout: StoreLayout) -> pa.Table:
    """The tracer's records (``prompt_id``, ``text``, tags) when it was given them, else one row
    per prompt id the block met, in order, with a null ``text``."""
    import pyarrow as pa

    from moelens.collect import prompts_table

    if tracer._records is not None:
        return prompts_table(tracer._records, layout)
    id_type = layout.tokens_schema().field("prompt_id").type
    return pa.table({"prompt_id": pa.array(tracer._seen_prompt_ids, type=id_type), "text": pa.nulls(len(tracer._seen_prompt_ids), pa.string())})


def _sorted_table(columns: dict[str, Any], schema: pa.Schema, keys: Sequence[str]) -> pa.Table:
    """The table of ``columns`` (numpy arrays or Arrow arrays) in ``schema``, rows sorted by ``keys``."""
    import pyarrow as pa

    arrays = {name: columns[name] for name in schema.names}
    table = pa.Table.from_pydict(
        {name: arrays[name] if isinstance(arrays[name], pa.Array) else pa.array(arrays[name], type=schema.field(name).type) for name in schema.names},
        schema=schema,
    )
    if _in_order([columns[key] for key in keys]):  # one forward over rows in id order: nothing to sort
        return table
    return table.sort_by([(key, "ascending") for key in keys])


def _in_order(keys: Sequence[np.ndarray]) -> bool:
    """Whether the rows are already sorted by ``keys`` (lexicographically, ascending): one O(n) pass."""
    import numpy as np

    undecided = np.ones(max(len(keys[0]) - 1, 0), dtype=bool)  # row pairs not yet ordered by an earlier key
    for key in keys:
        before, after = key[:-1], key[1:]
        if (after < before)[undecided].any():
            return False
        undecided &= after == before
    return True


def _ranking(model: nn.Module, layers: Sequence[MoeLayer]) -> dict[int, tuple[RoutingRule, RouterReading, torch.Tensor | None]]:
    """Per MoE layer whose weights are not monotone in the choice scores (a correction bias or a
    per-expert scale): its verified rule, router reading and correction bias to rank slots by.
    Other layers, and layers no rule reproduces, rank by weight."""
    from moelens.hooks.adapters import correction_bias_of

    if not any(layer.correction_bias or layer.expert_scale for layer in layers):
        return {}
    check = routing_check.routing_check(model)
    ranking = {}
    for layer in layers:
        routing = check.layers[layer.index]
        if routing.rule is not None and (routing.reading.correction_bias or routing.reading.expert_scale):
            bias = correction_bias_of(layer) if routing.reading.correction_bias else None
            ranking[layer.index] = (routing.rule, routing.reading, bias)
    return ranking


def _end_token_ids(model: nn.Module, tokenizer: Any, given: Collection[int] | None) -> torch.Tensor | None:
    """The end-of-sequence ids after which a generated row holds no real token (``None``: none)."""
    import torch

    if given is None:
        found: set[int] = set()
        config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        found.update([config_ids] if isinstance(config_ids, int) else config_ids or [])
        tokenizer_id = getattr(tokenizer, "eos_token_id", None)
        if isinstance(tokenizer_id, int):
            found.add(tokenizer_id)
        given = found
    return torch.tensor(sorted(given), dtype=torch.long) if given else None


def store_layout(model: nn.Module, layers: Sequence[MoeLayer], *, prompt_id_type: str = "uint32") -> StoreLayout:
    """The store layout (column types) for traces of ``model``."""
    view = moe_view(model)
    text_config = view.text_config
    return StoreLayout(
        num_layers=view.num_decoder_layers,
        num_experts=max(layer.num_experts for layer in layers),
        top_k=max(layer.top_k for layer in layers),
        max_positions=max(int(getattr(text_config, "max_position_embeddings", 0) or 1 << 16), 2),
        prompt_id_type=prompt_id_type,
    )


def trace(
    model: nn.Module,
    *,
    prompts: Sequence[str | Mapping[str, Any]] | None = None,
    tags: Mapping[str, Sequence[Any]] | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    truncate: bool = False,
    full_logits: bool = False,
    prompt_ids: Sequence[Any] | None = None,
    layout: StoreLayout | None = None,
    end_token_ids: Collection[int] | None = None,
    max_device_bytes: int | None = DEFAULT_MAX_DEVICE_BYTES,
) -> Tracer:
    """Record routing decisions of ``model``: inside a ``with`` block, or over ``prompts`` at once.

    Two uses::

        with moelens.trace(model, tokenizer=tokenizer) as tr:      # whatever forward calls run inside
            model.generate(**batch, max_new_tokens=8)
        tr = moelens.trace(model, prompts=texts, tags={"domain": domains}, tokenizer=tokenizer)  # runs them now

    Args:
        model: a transformers MoE model (any family whose experts follow transformers' experts
            interface, or whose router returns a dense score matrix; see ``moelens families``).
        prompts: run these now and return the finished trace: strings, or records (dicts with a
            ``text`` field, an optional ``id`` and tag fields, as in a prompt file). They are fed
            in batches of ``batch_size``, left-padded, like ``moelens collect`` feeds them (the same
            code: :func:`moelens.collect.trace_records`), with greedy generation of
            ``max_new_tokens`` tokens when it is above 0. Prompt ids: the records' ``id``, else
            0, 1, 2, ... in order. Needs ``tokenizer``.
        tags: with ``prompts``: {tag column: one value per prompt}, e.g. ``{"domain": ["code", "en"]}``;
            they become columns of the ``prompts`` table (what ``ftri_scores(trace, tag="domain", ...)`` groups by).
        tokenizer: if given, the ``tokens`` table carries token strings and the trace knows the
            special tokens (which analyses exclude by default).
        batch_size, max_new_tokens, truncate: with ``prompts``: prompts per forward call, tokens to
            generate per prompt, and whether prompts longer than the context (less
            ``max_new_tokens``) are cut to it (default: refused with a :class:`~moelens.errors.CollectError`).
        full_logits: also record every router's full logits (``logits`` table, float16).
        prompt_ids: in a ``with`` block: ids for the prompts in the order the traced forward calls
            meet them (a new prompt per batch row at each prefill); default 0, 1, 2, ...
        layout: the column types of the tables (default: derived from the model and the ids).
        end_token_ids: on decode steps, a row's first fed token among these ids ends the row: it
            and every later token of the row (padding ``generate`` feeds to finished rows while
            others go on) are not recorded. Default: the model's ``generation_config.eos_token_id``
            and the tokenizer's EOS; ``()`` records every fed token. Prompt tokens are never cut.
        max_device_bytes: recorded routing kept on accelerators (GPU) during the block; past it the
            oldest steps move to pinned host memory asynchronously, so device memory stays flat
            for long generations. ``None``: keep everything on the device until the block ends.
            A step holds ``layers x tokens x k x 16`` bytes (plus ``layers x tokens x E x 4`` with ``full_logits``).
            CPU models hold everything on the host anyway.

    Returns:
        a :class:`Tracer`, a :class:`~moelens.store.Trace`: without ``prompts`` its tables are
        readable once the block has ended without error; with ``prompts`` it has already finished.
    """
    options: dict[str, Any] = dict(full_logits=full_logits, layout=layout, end_token_ids=end_token_ids, max_device_bytes=max_device_bytes)
    if prompts is None:
        if tags is not None:
            raise ValueError("tags label the prompts given as trace(model, prompts=[...], tags=...); pass the prompts too")
        return Tracer(model, tokenizer=tokenizer, prompt_ids=prompt_ids, **options)
    if prompt_ids is not None:
        raise ValueError("with prompts=, give each prompt's id as the `id` field of its record, not as prompt_ids")
    if tokenizer is None:
        raise ValueError("trace(model, prompts=...) tokenizes the prompts: pass tokenizer= (moelens.load returns one)")
    from moelens.collect import check_lengths, prompt_records, trace_records

    records = prompt_records(prompts, tags)
    check_lengths(model, tokenizer, records, max_new_tokens=max_new_tokens, truncate=truncate)
    return trace_records(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens, truncate=truncate, **options)
