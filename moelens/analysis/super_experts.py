"""Super experts (after "Unveiling Super Experts in MoE LLMs"): find them on a live model, and measure dropping them.

A super expert is an expert whose down_proj output reaches extreme magnitudes on a few tokens and
so feeds the massive residual-stream activations that attention sinks rely on. Here:

* :func:`profile_super_experts` runs calibration texts once through the model and measures, per
  expert, the maximum |down_proj output| over **all** tokens routed to it (the authors' hook read
  only the first routed row), the residual stream's largest magnitudes per layer, and the share of
  attention every head puts on the first token; then applies :func:`detect_super_experts`.
* :func:`drop_report` drops the super experts (still selected, contribute nothing, weight not
  redistributed) and, as a control, as many random non-super experts over several seeds, and
  compares held-out loss, massive activations and sink mass.
* :func:`top_experts` and :func:`to_spec`: the flagged routed super experts as {layer: experts},
  and as an intervention (default: drop them), with the same shape as every analysis' helpers.

Padding tokens are excluded everywhere; ``text`` columns index the caller's ``texts`` and
``position`` counts from the text's first token (0, usually ``<bos>``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from moelens.analysis._profiling_experts import TokenBatch, profiling_experts, token_batches
from moelens.hooks.adapters import MoeLayer, input_device, moe_layers, moe_view

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from moelens.interventions import Intervention

ExpertsByLayer = Mapping[int, Sequence[int]]


# the experts-table column each reading of an expert's output fills (see SuperExpertOptions.reading)
OUTPUT_COLUMN = {"all_rows": "max_output", "first_row": "first_row_max"}


@dataclass(frozen=True, kw_only=True)
class SuperExpertOptions:
    """How :func:`profile_super_experts` runs and detects, and how :func:`drop_report` runs
    (it reads ``batch_size``, ``max_length`` and ``sinks``). Defaults follow the paper and its code.

    Running the texts:
        batch_size: texts per forward pass (padding is excluded from every measurement).
        max_length: truncate each text to this many tokens; ``None`` keeps whole texts.
        sinks: measure attention sinks (runs attention eagerly while profiling; no sinks table otherwise).
        top_n: how many of the largest residual-stream magnitudes to keep per layer.

    Detecting super experts (:func:`detect_super_experts`):
        percentile: a super expert's max output exceeds this percentile (0-100) of the kept experts' maxima (99.5).
        fraction_of_max: ... and this fraction of the largest of them (0.1).
        layer_fraction: experts of layers l < round(layer_fraction x decoder layers) are kept (0.75:
            the layers where massive activations form).
        reading: ``"all_rows"`` the max over every routed token; ``"first_row"`` the authors' hook
            (each forward call's first routed row only; reproduces their tables).

    Flagging massive activations (Sun et al.'s criterion):
        massive_abs: magnitude above this absolute value (100) ...
        massive_ratio: ... and above this multiple of the text's median magnitude (1000).
    """

    batch_size: int = 8
    max_length: int | None = None
    sinks: bool = True
    top_n: int = 3
    percentile: float = 99.5
    fraction_of_max: float = 0.1
    layer_fraction: float = 0.75
    reading: Literal["all_rows", "first_row"] = "all_rows"
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size={self.batch_size!r}: use a whole number >= 1")
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ValueError(f"max_length={self.max_length!r}: use None or a whole number >= 1")
        if not (isinstance(self.top_n, int) and self.top_n >= 1):
            raise ValueError(f"top_n={self.top_n!r}: use a whole number >= 1")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile={self.percentile!r} is outside [0, 100]")
        if not 0 <= self.fraction_of_max <= 1:
            raise ValueError(f"fraction_of_max={self.fraction_of_max!r} is outside [0, 1]")
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"layer_fraction={self.layer_fraction!r} is outside (0, 1]")
        if self.reading not in OUTPUT_COLUMN:
            raise ValueError(f"reading={self.reading!r}: use 'all_rows' or 'first_row'")


@dataclass
class SuperExpertReport:
    """What :func:`profile_super_experts` found.

    Attributes:
        experts: one row per (layer, expert), routed and shared (dense MLPs excluded). Columns:
            ``layer``, ``expert`` (-1 for a shared expert), ``kind`` ("routed" | "shared"),
            ``tokens`` (the real tokens it processed: those routed to it, every real token for a
            shared expert), ``max_output`` (max |down_proj output| before the routing weight; NaN
            if it never ran), ``channel``, ``text``, ``position`` (where the max
            occurs), ``first_token_max`` (the max over first tokens only; NaN if never routed there),
            ``first_row_max`` (the authors' reading: per forward call only the first real row the
            expert processed, i.e. their hook's ``output[0]``; experts take their rows slot by slot,
            tokens that chose them as top-1 first, token order within a slot; the max over calls),
            ``super`` (bool).
        massive: the ``top_n`` largest residual-stream magnitudes (decoder layer outputs) per layer.
            Columns: ``layer``, ``place`` (1 = largest in the layer), ``value`` (signed),
            ``magnitude``, ``text``, ``position``, ``channel``, ``median`` (median |h| over that
            text's hidden state at that layer), ``ratio`` (magnitude / median), ``massive``
            (magnitude > abs threshold and ratio > ratio threshold).
        sinks: per layer and head, ``sink_mass``: the mean attention probability on the text's first
            token over all later query tokens. Columns ``layer``, ``head``, ``sink_mass``. Empty when
            sinks were not measured.
        thresholds: the values the detection rule used (``percentile_value``, ``fraction_value``,
            ``threshold``, ``max_layer`` exclusive) and its settings.
    """

    experts: pd.DataFrame
    massive: pd.DataFrame
    sinks: pd.DataFrame
    thresholds: dict[str, Any]

    @property
    def super_experts(self) -> pd.DataFrame:
        """The rows of :attr:`experts` flagged as super experts, largest first."""
        return self.experts[self.experts["super"]].sort_values("max_output", ascending=False)


def top_experts(report: SuperExpertReport, n: int | None = None) -> dict[int, list[int]]:
    """The routed super experts of ``report`` as {layer: sorted experts} (shared experts cannot be
    dropped by routing and are left out).

    ``n``: ``None`` (default, the paper's) every flagged routed super expert; a whole number >= 1:
    the ``n`` with the largest maxima over all layers (not per layer), by the column the detection
    read (``max_output``, or ``first_row_max`` with ``reading="first_row"``), ties to the lower
    (layer, expert).
    """
    from moelens.analysis._specs import by_layer, check_count

    check_count(n, optional=True)
    column = OUTPUT_COLUMN[report.thresholds.get("reading", "all_rows")]
    routed = report.experts[report.experts["super"] & (report.experts["kind"] == "routed")]
    routed = routed.sort_values([column, "layer", "expert"], ascending=[False, True, True], kind="stable")
    return by_layer(routed if n is None else routed.head(n))


def to_spec(report: SuperExpertReport, n: int | None = None, *, kind: str = "drop", **options: Any) -> Intervention:
    """An intervention on :func:`top_experts` ``(report, n)``: every routed super expert, or the ``n``
    largest over all layers (not per layer).

    Kinds:
        ``"drop"`` (default, the paper's): the experts stay selected, their output is zeroed and
            their weight is not given to the others (``disable(experts, mode=Drop())``), as
            :func:`drop_report` measures.
        ``"reroute"``: they leave the choice and the next-best expert takes each slot (``disable(experts)``).

    ``options`` go to the constructor (``tokens``).
    """
    from moelens.analysis._specs import build, disable_builders

    return build(kind, disable_builders(), top_experts(report, n), **options)


def profile_super_experts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    options: SuperExpertOptions = SuperExpertOptions(),
) -> SuperExpertReport:
    """Profile ``texts`` through ``model`` (one forward per batch, no gradients) and detect super experts.

    Every real token of every text counts (padding excluded); positions count from each text's first
    token. Experts are profiled through the moelens experts implementation (outputs bitwise those of
    eager experts); with ``options.sinks`` the attention runs eagerly so that weights can be read.
    Both are switched back on return. Detection: :func:`detect_super_experts` with ``options``;
    massive activations: ``options.massive_abs`` and ``options.massive_ratio``. See
    :class:`SuperExpertReport` for the tables (magnitudes in the model's hidden-state units).
    """
    layers = moe_layers(model)
    run = _observe(model, tokenizer, texts, batch_size=options.batch_size, max_length=options.max_length,
                   layers=layers, experts=True, sinks=options.sinks, top_n=options.top_n)
    num_layers = moe_view(model).num_decoder_layers
    experts, thresholds = detect_super_experts(run.experts, num_layers=num_layers, options=options)
    massive = run.massive.assign(
        massive=lambda d: (d["magnitude"] > options.massive_abs) & (d["ratio"] > options.massive_ratio)
    )
    thresholds.update(massive_abs=options.massive_abs, massive_ratio=options.massive_ratio)
    return SuperExpertReport(experts=experts, massive=massive, sinks=run.sinks, thresholds=thresholds)


def detect_super_experts(
    experts: pd.DataFrame,
    *,
    num_layers: int,
    options: SuperExpertOptions = SuperExpertOptions(),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Flag super experts, as the authors' code does; reads ``options``' ``percentile``,
    ``fraction_of_max``, ``layer_fraction`` and ``reading``.

    ``experts``: the :attr:`SuperExpertReport.experts` columns ``layer``, ``max_output`` and
    ``first_row_max`` (one row per routed or shared expert); ``num_layers``: the model's decoder layers.
    Kept layers: l < round(``layer_fraction`` x ``num_layers``) (where massive activations form).
    A = the maxima a(l, e) of every expert of the kept layers that ran (routed and shared; dense
    MLPs are not in ``experts``). Super expert iff a > P_percentile(A) and a > ``fraction_of_max``
    x max(A). Both thresholds come from the kept layers only: computed over all layers, one large
    outlier in a late layer would hide the real super experts.

    ``reading`` picks a(l, e): ``"all_rows"`` (default) the max over every routed token
    (``max_output``); ``"first_row"`` the authors' hook, which read ``output[0]``, the first routed
    token's row of each forward call only (``first_row_max``): use it to reproduce their tables;
    it misses extremes on any other token. With fewer than 200 kept experts the percentile lies
    between the two largest maxima. Returns ``experts`` with a ``super`` column, and the
    thresholds used.
    """
    import numpy as np

    percentile, fraction_of_max, reading = options.percentile, options.fraction_of_max, options.reading
    column = OUTPUT_COLUMN[reading]
    max_layer = round(options.layer_fraction * num_layers)
    kept = experts["layer"] < max_layer
    maxima = experts.loc[kept, column].dropna().to_numpy()
    if maxima.size == 0:
        raise ValueError(
            f"no expert of the kept layers (< {max_layer}) processed any token: nothing to detect "
            "(were the texts empty, or is layer_fraction too small?)"
        )
    percentile_value = float(np.percentile(maxima, percentile))
    fraction_value = float(fraction_of_max * maxima.max())
    threshold = max(percentile_value, fraction_value)
    flagged = kept & (experts[column] > threshold)
    thresholds = dict(
        percentile=percentile, fraction_of_max=fraction_of_max, layer_fraction=options.layer_fraction,
        percentile_value=percentile_value, fraction_value=fraction_value,
        threshold=threshold, max_layer=float(max_layer), reading=reading,
    )
    return experts.assign(super=flagged.to_numpy()), thresholds


def sink_decay(before: Any, after: Any) -> float:
    """D = 1 - mean_h(sink_after / sink_before) over heads (array-likes of per-head sink mass, same shape).

    1 means the sinks vanished, 0 unchanged, negative stronger. Heads without sink mass before are skipped.
    """
    import numpy as np

    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"before and after must have the same shape, got {before.shape} and {after.shape}")
    kept = before > 0
    if not kept.any():
        raise ValueError("no head has any sink mass before the intervention")
    return float(1.0 - np.mean(after[kept] / before[kept]))


@dataclass
class DropReport:
    """What :func:`drop_report` measured.

    ``runs``: one row per forward run: ``condition`` ("baseline" | "super" | "random"), ``seed``
    (-1 unless random), ``experts`` (how many dropped), ``loss`` (mean next-token NLL on the
    held-out texts), ``delta_loss``, ``max_massive`` (largest residual-stream magnitude over all
    layers), ``sink_mass`` (mean over layers and heads), ``sink_decay`` (D against the baseline,
    over all layers' heads). ``summary``: the same columns averaged per condition (random over seeds).
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    dropped: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # condition[/seed] -> spec

    def __str__(self) -> str:
        return self.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def drop_report(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    super_experts: ExpertsByLayer | SuperExpertReport,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    options: SuperExpertOptions = SuperExpertOptions(),
) -> DropReport:
    """Drop the super experts, and as a control as many random routed non-super experts (one draw
    per seed, from all MoE layers), and measure the change on held-out ``texts``.

    ``super_experts``: {layer: [routed expert ids]} or a :class:`SuperExpertReport` (its routed
    super experts, :func:`top_experts`). Runs as ``options`` say (``batch_size``, ``max_length``, ``sinks``; without
    sinks the sink columns are NaN). Drop = ``disable(..., mode=Drop())`` through
    ``moelens.interventions``: the expert is still selected, its output is zeroed and its weight is
    not given to the others. Shared experts cannot be dropped this way and are ignored. Loss counts
    every real next-token prediction of the texts. Prints nothing; ``print(report)`` shows the summary.
    """
    batch_size, max_length, sinks = options.batch_size, options.max_length, options.sinks
    import numpy as np
    import pandas as pd

    from moelens.interventions import Drop, disable, intervene

    layers = moe_layers(model)
    chosen = top_experts(super_experts) if isinstance(super_experts, SuperExpertReport) else super_experts
    chosen = {int(l): sorted({int(e) for e in es}) for l, es in chosen.items() if es}
    count = sum(len(es) for es in chosen.values())
    if count == 0:
        raise ValueError("no routed super experts to drop")
    pool = [(l.index, e) for l in layers for e in range(l.num_experts) if e not in chosen.get(l.index, ())]
    if count > len(pool):
        raise ValueError(f"cannot draw {count} random control experts from {len(pool)} non-super experts")

    conditions: list[tuple[str, int, dict[int, list[int]]]] = [("baseline", -1, {}), ("super", -1, chosen)]
    for seed in seeds:
        picks = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
        spec: dict[int, list[int]] = {}
        for i in sorted(picks):
            spec.setdefault(pool[i][0], []).append(pool[i][1])
        conditions.append(("random", int(seed), spec))

    rows, baseline = [], None
    for condition, seed, spec in conditions:
        with intervene(model, disable(spec, mode=Drop())):  # the baseline's empty spec changes nothing
            run = _observe(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, layers=layers,
                           experts=False, sinks=sinks, top_n=1)
        sink = run.sinks.set_index(["layer", "head"])["sink_mass"]  # empty without sinks
        baseline = sink if baseline is None else baseline
        rows.append(dict(
            condition=condition, seed=seed, experts=sum(len(es) for es in spec.values()), loss=run.loss,
            max_massive=float(run.massive["magnitude"].max()), sink_mass=float(sink.mean()),
            sink_decay=sink_decay(baseline, sink.reindex(baseline.index)) if sinks else float("nan"),
        ))
    runs = pd.DataFrame(rows)
    runs.insert(4, "delta_loss", runs["loss"] - runs["loss"].iloc[0])
    summary = runs.drop(columns="seed").groupby("condition", sort=False).mean().reset_index()
    dropped = {c if s < 0 else f"{c}/{s}": spec for c, s, spec in conditions if spec}
    return DropReport(runs=runs, summary=summary, dropped=dropped)


# --- one observed pass over the texts ----------------------------------------------------------
@dataclass
class _Run:
    experts: pd.DataFrame | None
    massive: pd.DataFrame
    sinks: pd.DataFrame
    loss: float


def _observe(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None,
    layers: list[MoeLayer],
    experts: bool,
    sinks: bool,
    top_n: int,
) -> _Run:
    """Run ``texts`` once, measuring expert maxima (with ``experts``), massive activations, sinks and loss."""
    import torch

    device = input_device(model)
    decoder_layers = list(moe_view(model).decoder_layers)
    maxima = {l.index: _MaxOutputs(l.num_experts + (l.shared is not None), device) for l in layers} if experts else {}
    residual, sink, loss = _Residuals(len(decoder_layers), top_n), SinkMass(), _Loss()
    with ExitStack() as stack:
        for i, decoder_layer in enumerate(decoder_layers):
            stack.callback(decoder_layer.register_forward_hook(residual.hook(i)).remove)
        for l in layers:
            if experts and l.shared is not None:
                stack.callback(l.shared.down_proj.register_forward_hook(maxima[l.index].shared_hook).remove)
        stack.enter_context(torch.no_grad())
        if experts:
            stack.enter_context(profiling_experts(model, {l.experts: maxima[l.index] for l in layers}))
        if sinks:
            stack.enter_context(_eager_attention(model))
        for batch in token_batches(tokenizer, texts, batch_size=batch_size, device=device, max_length=max_length):
            for observer in (*maxima.values(), residual):
                observer.batch = batch
            out = model(**batch.inputs, output_attentions=sinks, use_cache=False)
            loss.add(out.logits, batch)
            if sinks:
                if not out.attentions:
                    raise RuntimeError(
                        f"{type(model).__name__} returned no attention weights: sinks cannot be measured"
                    )
                sink.add(out.attentions, batch)
    table = None
    if experts:
        import pandas as pd

        table = pd.concat([maxima[l.index].frame(l) for l in layers], ignore_index=True)
    return _Run(experts=table, massive=residual.frame(), sinks=sink.frame(), loss=loss.value())


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention (the only kind that returns weights) for the block; the previous one after."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _MaxOutputs:
    """Running max |down_proj output| per expert of one MoE layer, kept on the model's device.

    Slots 0..E-1 are the routed experts, slot E the shared expert (if any).
    """

    def __init__(self, slots: int, device: Any) -> None:
        import torch

        self.batch: TokenBatch | None = None
        self.value = torch.full((slots,), -1.0, device=device)  # -1: no real token seen yet
        self.first = torch.full((slots,), -1.0, device=device)
        self.first_row = torch.full((slots,), -1.0, device=device)  # the authors' output[0] reading
        self.where = torch.zeros(slots, 3, dtype=torch.long, device=device)  # text, position, channel
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)

    def expert_output(self, expert: int, tokens: torch.Tensor, output: torch.Tensor, weights: torch.Tensor) -> None:
        self._update(expert, tokens, output)

    def routed_output(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        pass

    def shared_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        import torch

        rows = output.reshape(-1, output.shape[-1])  # [B, S, H] or [T, H] -> [T, H]
        self._update(len(self.value) - 1, torch.arange(rows.shape[0], device=rows.device), rows)

    def _update(self, slot: int, tokens: torch.Tensor, output: torch.Tensor) -> None:
        import torch

        batch = self.batch
        valid = batch.valid[tokens]  # [n]
        # padding rows get -1 so they never win the max
        row_max, channel = output.detach().abs().float().masked_fill(~valid[:, None], -1.0).max(dim=1)  # [n]
        best = row_max.argmax()
        token = tokens[best]
        better = row_max[best] > self.value[slot]
        self.value[slot] = torch.where(better, row_max[best], self.value[slot])
        found = torch.stack([batch.text[token], batch.position[token], channel[best]])
        self.where[slot] = torch.where(better, found, self.where[slot])
        self.tokens[slot] += valid.sum()
        first = batch.position[tokens] == 0
        self.first[slot] = torch.maximum(self.first[slot], row_max.masked_fill(~first, -1.0).max())
        # the first real row routed to the expert in this forward call (row_max is -1 when there is none)
        self.first_row[slot] = torch.maximum(self.first_row[slot], row_max[valid.long().argmax()])

    def frame(self, layer: MoeLayer) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        value, first = self.value.cpu().double().numpy(), self.first.cpu().double().numpy()
        first_row = self.first_row.cpu().double().numpy()
        where = self.where.cpu().numpy()
        slots = len(value)
        return pd.DataFrame({
            "layer": layer.index,
            "expert": [e if e < layer.num_experts else -1 for e in range(slots)],
            "kind": ["routed" if e < layer.num_experts else "shared" for e in range(slots)],
            "tokens": self.tokens.cpu().numpy(),
            "max_output": np.where(value >= 0, value, np.nan),
            "channel": where[:, 2],
            "text": where[:, 0],
            "position": where[:, 1],
            "first_token_max": np.where(first >= 0, first, np.nan),
            "first_row_max": np.where(first_row >= 0, first_row, np.nan),
        })


class _Residuals:
    """The ``top_n`` largest |h| of every decoder layer's output per text, with that text's median |h|."""

    def __init__(self, num_layers: int, top_n: int) -> None:
        self.batch: TokenBatch | None = None
        self.top_n = top_n
        self.candidates: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def hook(self, layer: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            import torch

            h = (output[0] if isinstance(output, tuple) else output).detach().float()  # [B, S, H]
            batch, (b, s), width = self.batch, self.batch.shape, h.shape[-1]
            real = batch.valid.view(b, s, 1).expand_as(h).reshape(b, s * width)  # [B, S*H]
            flat = h.reshape(b, s * width)
            magnitude = flat.abs()
            median = magnitude.masked_fill(~real, float("nan")).nanmedian(dim=1).values  # [B]
            top, index = magnitude.masked_fill(~real, -1.0).topk(min(self.top_n, s * width), dim=1)  # [B, n]
            token = torch.arange(b, device=h.device)[:, None] * s + index // width  # [B, n] flattened token
            columns = [top, flat.gather(1, index), batch.text[token], batch.position[token], index % width,
                       median[:, None].expand_as(top)]
            rows = torch.stack([c.double() for c in columns], dim=-1)  # [B, n, 6], as in `frame`
            keep = rows[..., 0] >= 0  # a batch row without real tokens has nothing to offer
            self.candidates[layer].append(rows[keep].cpu())

        return record

    def frame(self) -> pd.DataFrame:
        import pandas as pd
        import torch

        parts = []
        for layer, found in enumerate(self.candidates):
            rows = torch.cat(found) if found else torch.empty(0, 6, dtype=torch.float64)
            rows = rows[rows[:, 0].argsort(descending=True)[: self.top_n]]
            part = pd.DataFrame(rows.numpy(), columns=["magnitude", "value", "text", "position", "channel", "median"])
            parts.append(part.assign(layer=layer, place=range(1, len(part) + 1)))
        table = pd.concat(parts, ignore_index=True).astype({"text": "int64", "position": "int64", "channel": "int64"})
        table["ratio"] = table["magnitude"] / table["median"]
        return table[["layer", "place", "value", "magnitude", "text", "position", "channel", "median", "ratio"]]


class SinkMass:
    """Attention-sink accumulator: the attention probability each head puts on a text's first token,
    summed per (layer, head) over every later real query token of the texts added (padding and the
    first token's own query excluded); :meth:`frame` gives the mean per query."""

    def __init__(self) -> None:
        self.mass: list[torch.Tensor] | None = None  # per layer [heads]
        self.queries = 0

    def add(self, attentions: Sequence[torch.Tensor], batch: TokenBatch) -> None:
        """Add one forward's ``attentions`` (per decoder layer [B, heads, S, S] probabilities) for ``batch``."""
        import torch

        b, s = batch.shape
        position = batch.position.view(b, s)
        first = (position == 0).float().argmax(dim=1)  # [B] column of each text's first token
        queries = (position > 0)[:, None, :]  # [B, 1, S]: the first token attends only to itself; no padding
        masses = []
        for probs in attentions:  # [B, heads, S, S]
            on_first = probs.float().gather(3, first.view(b, 1, 1, 1).expand(b, probs.shape[1], s, 1))[..., 0]
            masses.append(torch.where(queries, on_first, 0.0).sum(dim=(0, 2)))  # [heads]; where: padding may be NaN
        self.mass = masses if self.mass is None else [m + n for m, n in zip(self.mass, masses, strict=True)]
        self.queries += int(queries.sum())

    def frame(self) -> pd.DataFrame:
        """Columns ``layer``, ``head``, ``sink_mass`` (mean over the query tokens added; empty if none were)."""
        import pandas as pd

        if self.mass is None:
            return pd.DataFrame({"layer": [], "head": [], "sink_mass": []})
        return pd.DataFrame([
            dict(layer=layer, head=head, sink_mass=float(m) / max(self.queries, 1))
            for layer, mass in enumerate(self.mass) for head, m in enumerate(mass.cpu())
        ])


class _Loss:
    """Mean next-token negative log-likelihood over real tokens."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, logits: torch.Tensor, batch: TokenBatch) -> None:
        from moelens.evaluation import next_token_nll

        sums, counts = next_token_nll(logits, batch.inputs["input_ids"], batch.inputs["attention_mask"])
        self.total += float(sums.sum())
        self.count += int(counts.sum())

    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")
