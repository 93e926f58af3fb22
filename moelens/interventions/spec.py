"""Intervention specs: small, serialisable, combinable descriptions of a routing change.

A spec is data. It says which experts, in which layers, for which tokens, and what happens to them;
:func:`moelens.interventions.intervene` binds it to a model (checking it against the model's
layers and experts) and applies it through the one routing function of ``moelens.kernels``.

Vocabulary: *drop* = the expert stays chosen but its output is zeroed (optionally the others renormalised);
*reroute* = a disabled expert's slot goes to the next choice; *keep* = routing restricted to a kept set of
experts; *prune* = physically remove experts from a checkpoint (:func:`moelens.interventions.export.export_pruned`,
``moelens prune``), which only a spec of one ``keep`` part can describe. A *rank* counts from 0 (0 = the router's
first choice), as the store's ``routes.rank`` does. ``layers`` restricts a part to decoder-layer indices.

JSON form (format version 2): ``{"version": 2, "interventions": [{"kind": "disable", "experts": {"3": [5, 9]},
"mode": {"kind": "reroute"}, "tokens": "all"}, ...]}``. Unknown kinds or fields are errors that name them.

A spec without ``"version"`` is format version 1 (written before this vocabulary) and loads with its meaning
unchanged: a ``rank`` part's 1-based ``rank`` becomes 0-based (1-based 2, the second choice, loads as 0-based 1),
kind ``"prune"`` with ``"keep"`` loads as a ``keep`` part, ``"only_layers"`` loads as ``"layers"``, and disable
parts from before modes were typed (``"mode": "drop", "renormalize": true``) load as the equivalent typed mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from moelens.errors import SpecError

TokenScope = str | tuple[int, ...]  # "all", "prompt", "generated", or explicit positions
ExpertsByLayer = Mapping[int, Iterable[int]]


def _experts(value: ExpertsByLayer, what: str) -> dict[int, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{what}: expected a mapping layer -> experts, e.g. {{3: [5, 9]}}, got {type(value).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for layer, experts in value.items():
        try:
            ids = tuple(sorted({int(e) for e in experts}))
            out[int(layer)] = ids
        except (TypeError, ValueError):
            raise SpecError(f"{what}: layer {layer!r} must map to a list of integer expert ids, got {experts!r}") from None
    return out


def _scope(tokens: Any) -> TokenScope:
    if tokens in ("all", "prompt", "generated"):
        return tokens
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, int) and t >= 0 for t in tokens):
        return tuple(sorted(set(tokens)))
    raise SpecError(f"tokens={tokens!r}: use 'all', 'prompt', 'generated', or a list of token positions (integers >= 0)")


@dataclass(frozen=True)
class Part:
    """One routing change. Subclasses declare ``kind`` and their fields."""

    kind: ClassVar[str]
    tokens: TokenScope = "all"

    def touched_layers(self) -> tuple[int, ...] | None:
        """The decoder-layer indices this part changes the routing of, ascending; ``None`` = every MoE layer."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The part as JSON-ready data: ``{"kind": ..., <field>: <value>, ...}`` (layer keys as strings)."""
        data: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = {str(k): list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data


@dataclass(frozen=True)
class Reroute:
    """Disable mode: the expert is excluded from the choice and the next-best expert takes its slot, so every
    token keeps its full set of top-k experts."""

    name: ClassVar[str] = "reroute"

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "reroute"}``."""
        return {"kind": self.name}


@dataclass(frozen=True)
class Drop:
    """Disable mode: the expert is still chosen but contributes nothing (weight 0 after selection).

    ``renormalize`` rescales the token's other chosen experts to the original weight total (MoTE's
    switch-off); ``False`` loses the dropped weight (the super-experts experiment).
    """

    name: ClassVar[str] = "drop"
    renormalize: bool = False

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "drop", "renormalize": bool}``."""
        return {"kind": self.name, "renormalize": self.renormalize}


DisableMode = Reroute | Drop
_MODES: dict[str, type[Reroute] | type[Drop]] = {"reroute": Reroute, "drop": Drop}


@dataclass(frozen=True)
class Disable(Part):
    """Switch experts off, in one of two modes: :class:`Reroute` (the next-best expert takes the slot)
    or :class:`Drop` (still chosen, contributes nothing, optionally renormalised)."""

    kind: ClassVar[str] = "disable"
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    mode: DisableMode = Reroute()

    def touched_layers(self) -> tuple[int, ...]:
        return tuple(self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "mode": self.mode.to_dict()}


@dataclass(frozen=True)
class Force(Part):
    """Put experts into every token's selected set; they take the lowest-ranked slots."""

    kind: ClassVar[str] = "force"
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def touched_layers(self) -> tuple[int, ...]:
        return tuple(self.experts)


@dataclass(frozen=True)
class Reweight(Part):
    """Multiply chosen experts' routing weights by ``factor`` (RICE), optionally renormalised."""

    kind: ClassVar[str] = "reweight"
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    factor: float = 1.0
    renormalize: bool = False

    def touched_layers(self) -> tuple[int, ...]:
        return tuple(self.experts)


@dataclass(frozen=True)
class LogitBias(Part):
    """Add a bias to router logits before the choice: soft steering towards or away from experts."""

    kind: ClassVar[str] = "logit_bias"
    bias: dict[int, dict[int, float]] = field(default_factory=dict)

    def touched_layers(self) -> tuple[int, ...]:
        return tuple(self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "bias": {str(l): {str(e): b for e, b in eb.items()} for l, eb in self.bias.items()}}


@dataclass(frozen=True)
class TopP(Part):
    """Dynamic routing (Dynamic-MoE): per token, the smallest prefix of experts (by choice score)
    whose probability mass exceeds ``p``. ``max_k`` caps the prefix; ``None`` (default) is no cap,
    as in the paper (a cap at the family's top-k would remove the method's point). ``renormalize``
    False keeps the raw probabilities as weights (the paper's). ``layers``: the decoder-layer indices it applies
    to (``None`` = every MoE layer)."""

    kind: ClassVar[str] = "top_p"
    p: float = 0.4
    max_k: int | None = None
    renormalize: bool = False
    layers: tuple[int, ...] | None = None

    def touched_layers(self) -> tuple[int, ...] | None:
        return self.layers


@dataclass(frozen=True)
class Rank(Part):
    """Route every token to only its rank-``rank`` expert (SCMoE's weak activation). ``rank`` counts from 0
    (0 = the router's first choice, 1 = the second: SCMoE's default), as the store's ``routes.rank`` does.

    Its weight is the family's routed scale: 1.0, or ``routed_scaling_factor`` for DeepSeek-V2/V3,
    whose top-k weights sum to that factor; a weight of 1.0 there would shrink the weak pass's
    routed output to 1/16 or 1/2.5 of the family's scale. Rank r counts in the family's choice
    order (the bias-corrected score on DeepSeek-V3), the order in which it picks its top-k. ``layers``: the
    decoder-layer indices it applies to (``None`` = every MoE layer)."""

    kind: ClassVar[str] = "rank"
    rank: int = 1
    layers: tuple[int, ...] | None = None

    def touched_layers(self) -> tuple[int, ...] | None:
        return self.layers


@dataclass(frozen=True)
class TopK(Part):
    """Route every token to its top-``k`` experts, ``k`` below the family's: the family's own rule
    (scores, normalisation, scale) with fewer slots. SCMoE's other weak activation (DeepSeekMoE: top-1).
    ``layers``: the decoder-layer indices it applies to (``None`` = every MoE layer)."""

    kind: ClassVar[str] = "top_k"
    k: int = 1
    layers: tuple[int, ...] | None = None

    def touched_layers(self) -> tuple[int, ...] | None:
        return self.layers


@dataclass(frozen=True)
class Keep(Part):
    """Restrict routing to the given experts in each listed layer (EASY-EP): every other expert of the layer
    is rerouted (its slot goes to the next kept choice); layers not listed are unchanged. Applies to every
    token. Physically removing the other experts from a checkpoint is *pruning*:
    :func:`moelens.interventions.export.export_pruned` of a spec holding one ``Keep`` part."""

    kind: ClassVar[str] = "keep"
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def touched_layers(self) -> tuple[int, ...]:
        return tuple(self.experts)


FORMAT_VERSION = 2  # the JSON format Intervention.to_dict writes; a spec without "version" is version 1
_KINDS: dict[str, type[Part]] = {cls.kind: cls for cls in (Disable, Force, Reweight, LogitBias, TopP, Rank, TopK, Keep)}


@dataclass(frozen=True)
class Intervention:
    """An ordered combination of parts; ``a + b`` combines. Apply with ``intervene(model, spec)``."""

    parts: tuple[Part, ...] = ()

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        return Intervention(self.parts + other.parts)

    def to_dict(self) -> dict[str, Any]:
        """``{"version": 2, "interventions": [part.to_dict(), ...]}``, parts in the order they were combined;
        ``version`` is the JSON format (:data:`FORMAT_VERSION`)."""
        return {"version": FORMAT_VERSION, "interventions": [part.to_dict() for part in self.parts]}

    def to_json(self, **dumps: Any) -> str:
        """:meth:`to_dict` as a JSON string; ``dumps`` go to ``json.dumps`` (e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **dumps)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "spec") -> Intervention:
        """Parse and validate :meth:`to_dict`'s form, ``{"version": 2, "interventions": [...]}``.

        A mapping without ``"version"`` is format version 1 and keeps its meaning (1-based ranks become
        0-based, kind ``"prune"`` becomes ``"keep"``, ``"only_layers"`` becomes ``"layers"``; see the module
        docstring). Raises :class:`SpecError` naming ``where`` and the offending part or field, also for
        a version other than 1 or 2.
        """
        if (
            not isinstance(data, Mapping)
            or not set(data) <= {"version", "interventions"}
            or not isinstance(data.get("interventions"), list)
        ):
            raise SpecError(f"{where}: expected {{\"interventions\": [...]}} with an optional \"version\": {FORMAT_VERSION}, got keys {sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
        version = data.get("version", 1)
        if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
            raise SpecError(f"{where}: unknown spec format version {version!r}; this moelens reads versions 1 and {FORMAT_VERSION}")
        items = data["interventions"]
        if version == 1:
            items = [_from_version_1(item, f"{where}, intervention {i}") for i, item in enumerate(items)]
        return cls(tuple(_part_from_dict(item, f"{where}, intervention {i}") for i, item in enumerate(items)))

    @classmethod
    def from_json(cls, text: str, *, where: str = "spec") -> Intervention:
        """:meth:`from_dict` of a JSON string; invalid JSON is a :class:`SpecError` with line and column."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{where} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
        return cls.from_dict(data, where=where)

    @classmethod
    def read(cls, path: str) -> Intervention:
        """:meth:`from_json` of the file at ``path`` (UTF-8); errors name the file."""
        from pathlib import Path

        return cls.from_json(Path(path).read_text(), where=str(path))


def _from_version_1(item: Any, where: str) -> Any:
    """A version-1 (version-less) part in version 2's words, with the same meaning."""
    if not isinstance(item, Mapping):
        return item  # _part_from_dict reports it
    item = dict(item)
    kind = item.get("kind")
    if kind == "rank" and "layers" in item:  # "layers" is version 2's word: its rank may count from 0
        raise SpecError(
            f"{where}: a rank part with \"layers\" in a spec without \"version\" is ambiguous: add \"version\": "
            f"{FORMAT_VERSION} (rank r counts from 0, 0 = the router's first choice) or write \"only_layers\" (version 1, ranks from 1)"
        )
    if kind == "disable" and "renormalize" in item:  # before modes were typed: "mode": "drop", "renormalize": true
        mode, renormalize = item.get("mode", "reroute"), item.pop("renormalize")
        if mode == "drop" and isinstance(renormalize, bool):
            item["mode"] = {"kind": "drop", "renormalize": renormalize}
        elif mode == "reroute" and renormalize is False:
            item["mode"] = {"kind": "reroute"}
        else:
            raise SpecError(
                f"{where}: disable: the old fields mode={mode!r}, renormalize={renormalize!r} do not describe a mode "
                "(renormalize applies to dropping only); write \"mode\": {\"kind\": \"drop\", \"renormalize\": true} "
                "or \"mode\": {\"kind\": \"reroute\"}"
            )
    if kind == "prune":
        item["kind"] = "keep"
        if "keep" in item:
            item["experts"] = item.pop("keep")
    if kind in ("top_p", "top_k", "rank") and "only_layers" in item:
        item["layers"] = item.pop("only_layers")
    if kind == "rank" and "rank" in item:
        r = item["rank"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise SpecError(
                f"{where}: rank {r!r} in a spec without \"version\" (format 1, ranks counted from 1); "
                f"write \"version\": {FORMAT_VERSION} for ranks that count from 0 (0 = the router's first choice)"
            )
        item["rank"] = r - 1
    return item


def _part_from_dict(item: Any, where: str) -> Part:
    """One part from its (version 2) JSON form."""
    if not isinstance(item, Mapping) or "kind" not in item:
        raise SpecError(f"{where}: each intervention is an object with a `kind` ({', '.join(_KINDS)})")
    kind = item["kind"]
    if kind not in _KINDS:
        hint = "; version 2 calls restricting routing to kept experts \"keep\" (field \"experts\")" if kind == "prune" else ""
        raise SpecError(f"{where}: unknown kind {kind!r}; known kinds: {', '.join(_KINDS)}{hint}")
    constructor = _CONSTRUCTORS[kind]
    arguments = {k: v for k, v in item.items() if k != "kind"}
    current = {f.name for f in fields(_KINDS[kind])}
    unknown = sorted(set(arguments) - current)
    if unknown:
        hint = "; version 2 calls \"only_layers\" \"layers\"" if "only_layers" in unknown else ""
        raise SpecError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} for kind {kind!r}; fields: {', '.join(sorted(current))}{hint}")
    try:
        (part,) = constructor(**arguments).parts
    except TypeError as error:
        raise SpecError(f"{where}: {error}") from None
    return part


# --- constructors: the public way to build specs; they validate what needs no model ---------------
def disable(experts: ExpertsByLayer, *, mode: DisableMode | Literal["reroute", "drop"] = Reroute(), tokens: Any = "all") -> Intervention:
    """Disable experts per layer, e.g. ``disable({3: [5, 9]})`` or ``disable({3: [5]}, mode=Drop(renormalize=True))``.

    ``experts``: {layer index: expert ids} (decoder-layer indices, experts 0..E-1). ``mode``: :class:`Reroute`
    (default) or :class:`Drop`; the strings ``"reroute"`` and ``"drop"`` stand for ``Reroute()`` and ``Drop()``.
    ``tokens``: "all", "prompt", "generated" or token positions. See :class:`Disable`.
    """
    return Intervention((Disable(experts=_experts(experts, "disable"), mode=_mode(mode), tokens=_scope(tokens)),))


def _mode(mode: Any) -> DisableMode:
    """A disable mode from a mode object, its name, or its JSON object."""
    built: Any = None
    if isinstance(mode, (Reroute, Drop)):
        built = mode
    elif isinstance(mode, str) and mode in _MODES:
        built = _MODES[mode]()
    elif isinstance(mode, Mapping) and mode.get("kind") in _MODES:  # the JSON form
        arguments = {k: v for k, v in mode.items() if k != "kind"}
        try:
            built = _MODES[mode["kind"]](**arguments)
        except TypeError:
            allowed = [f.name for f in fields(_MODES[mode["kind"]])]
            raise SpecError(f"disable: mode {dict(mode)!r} has unknown fields; a {mode['kind']!r} mode takes {allowed or 'none'}") from None
    if built is not None:
        if not isinstance(getattr(built, "renormalize", False), bool):
            raise SpecError(f"disable: mode {mode!r}: renormalize must be True or False")
        return built
    raise SpecError(
        f"disable: mode={mode!r}; use Reroute() or 'reroute' (next-best expert fills in), "
        "or Drop(renormalize=...) or 'drop' (contributes nothing)"
    )


def force(experts: ExpertsByLayer, *, tokens: Any = "all") -> Intervention:
    """Force experts into the selected set per layer. See :class:`Force`."""
    return Intervention((Force(experts=_experts(experts, "force"), tokens=_scope(tokens)),))


def reweight(experts: ExpertsByLayer, factor: float, *, renormalize: bool = False, tokens: Any = "all") -> Intervention:
    """Multiply chosen experts' weights by ``factor`` (> 0). See :class:`Reweight`."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise SpecError(f"reweight: factor must be a finite number > 0, got {factor!r}")
    return Intervention((Reweight(experts=_experts(experts, "reweight"), factor=float(factor), renormalize=bool(renormalize), tokens=_scope(tokens)),))


def logit_bias(bias: Mapping[int, Mapping[int, float]], *, tokens: Any = "all") -> Intervention:
    """Add ``bias[layer][expert]`` to router logits before the choice. See :class:`LogitBias`."""
    try:
        table = {int(l): {int(e): float(b) for e, b in eb.items()} for l, eb in bias.items()}
    except (AttributeError, TypeError, ValueError):
        raise SpecError(f"logit_bias: expected {{layer: {{expert: bias}}}}, got {bias!r}") from None
    return Intervention((LogitBias(bias=table, tokens=_scope(tokens)),))


def top_p(p: float = 0.4, *, max_k: int | None = None, renormalize: bool = False, layers: Iterable[int] | None = None, tokens: Any = "all") -> Intervention:
    """Top-p dynamic routing (Dynamic-MoE defaults: p 0.4, raw probabilities). See :class:`TopP`.

    ``p`` in (0, 1]; ``max_k`` None or >= 1; ``layers``: decoder-layer indices (None = every MoE layer);
    ``tokens``: "all", "prompt", "generated" or token positions. Raises :class:`SpecError` otherwise.
    """
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise SpecError(f"top_p: p must be in (0, 1], got {p!r}")
    if max_k is not None and max_k < 1:
        raise SpecError(f"top_p: max_k must be at least 1, got {max_k}")
    return Intervention((TopP(p=float(p), max_k=max_k, renormalize=bool(renormalize), layers=_layers(layers, "top_p"), tokens=_scope(tokens)),))


def top_k(k: int = 1, *, layers: Iterable[int] | None = None, tokens: Any = "all") -> Intervention:
    """Route each token to its top-``k`` experts under the family's own rule. See :class:`TopK`.

    ``k``: an integer >= 1 (at most the family's top-k, checked when bound to a model); ``layers``:
    decoder-layer indices (None = every MoE layer); ``tokens`` as for :func:`top_p`.
    """
    if not isinstance(k, int) or k < 1:
        raise SpecError(f"top_k: k must be an integer >= 1, got {k!r}")
    return Intervention((TopK(k=k, layers=_layers(layers, "top_k"), tokens=_scope(tokens)),))


def rank(r: int = 1, *, layers: Iterable[int] | None = None, tokens: Any = "all") -> Intervention:
    """Route each token to its rank-``r`` expert only, at the family's routed scale. See :class:`Rank`.

    ``r`` counts from 0 like the store's ``routes.rank``: 0 = the router's first choice, 1 (default) = the
    second choice (SCMoE's weak activation); it must be below the layer's expert count (checked when bound).
    ``layers``: decoder-layer indices (None = every MoE layer); ``tokens`` as for :func:`top_p`.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise SpecError(f"rank: r must be an integer >= 0, got {r!r}; rank r counts from 0 (0 = the router's first choice)")
    return Intervention((Rank(rank=r, layers=_layers(layers, "rank"), tokens=_scope(tokens)),))


def keep(experts: ExpertsByLayer) -> Intervention:
    """Restrict routing to ``experts[layer]`` in each listed layer, e.g. ``keep({3: [0, 1, 2, 5]})`` (EASY-EP).

    The other experts of a listed layer are rerouted (each token's slots go to its best kept choices);
    unlisted layers are unchanged; every token is affected. At least top-k experts must stay per layer
    (checked when bound). :func:`moelens.interventions.export.export_pruned` turns such a spec into a
    pruned checkpoint. See :class:`Keep`.
    """
    return Intervention((Keep(experts=_experts(experts, "keep")),))


def _layers(layers: Iterable[int] | None, what: str) -> tuple[int, ...] | None:
    """``layers`` as sorted unique ints, or None (every MoE layer)."""
    if layers is None:
        return None
    try:
        return tuple(sorted({int(l) for l in layers}))
    except (TypeError, ValueError):
        raise SpecError(f"{what}: layers must be a list of integer layer indices or None, got {layers!r}") from None


def _from_fields(kind: str) -> Any:
    """Constructor used by JSON parsing: field names as keyword arguments."""

    def build(**kw: Any) -> Intervention:
        tokens = kw.pop("tokens", "all")
        if kind == "disable":
            return disable(kw.pop("experts", {}), mode=kw.pop("mode", "reroute"), tokens=tokens, **kw)
        if kind == "force":
            return force(kw.pop("experts", {}), tokens=tokens, **kw)
        if kind == "reweight":
            return reweight(kw.pop("experts", {}), kw.pop("factor", 1.0), tokens=tokens, **kw)
        if kind == "logit_bias":
            return logit_bias(kw.pop("bias", {}), tokens=tokens, **kw)
        if kind == "top_p":
            return top_p(kw.pop("p", 0.4), tokens=tokens, **kw)
        if kind == "rank":
            return rank(kw.pop("rank", 1), tokens=tokens, **kw)
        if kind == "top_k":
            return top_k(kw.pop("k", 1), tokens=tokens, **kw)
        if tokens != "all":
            raise SpecError("keep applies to every token (it models a smaller deployed model)")
        return keep(kw.pop("experts", {}), **kw)

    return build


_CONSTRUCTORS = {kind: _from_fields(kind) for kind in _KINDS}
