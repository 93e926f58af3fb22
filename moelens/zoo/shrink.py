"""Tiny random models of every Mixture-of-Experts family of the installed transformers.

Contract:

- :func:`moe_model_types` lists one ``model_type`` per MoE family (see the rule in its docstring);
- :func:`tiny_config` shrinks that family's *default* config with one generic, table-driven rule
  set (hidden 64, 4 heads / 2 KV heads of 16 dims, 8 routed experts, top-2, vocabulary 300,
  512 positions, the fewest layers that keep every layer kind) and returns the config of the text
  causal LM; a multimodal ``model_type`` gives its text backbone's config;
- :func:`build_tiny_model` builds that causal LM in float32, in eval mode, with weights fixed by
  ``seed`` (the global torch RNG is left as it was);
- :func:`survey` builds every family and runs one padded forward pass and a 3-token greedy
  ``generate``, recording why a family fails.

Random weights carry no specialization: these models exercise code paths (routing, shared and
null experts, dense leading layers, hybrid attention/SSM stacks), never findings.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import itertools
import math
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

VOCAB_SIZE = 300
HIDDEN_SIZE = 64
N_EXPERTS = 8
TOP_K = 2
# Special tokens land outside the ids the survey feeds (3..249), so they never collide with text.
_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# --- which modeling files are MoE --------------------------------------------------------------
# A modeling file is MoE when it decorates an experts class with ``use_experts_implementation`` or
# reads both a routed-expert count and a per-token expert count from its config (DBRX, JetMoE,
# Llama-4, LongCat, Doge predate the decorator).
_DECORATOR = re.compile(r"@use_experts_implementation")
_EXPERT_COUNT = re.compile(r"\.(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\b")
_TOP_K = re.compile(r"\.(num_experts_per_tok|num_experts_per_token|moe_topk|moe_top_k|moe_k|top_k_experts)\b")


@dataclasses.dataclass(frozen=True)
class FamilyBuild:
    """Outcome of building one family: ``reason`` is a one-line cause when ``built`` is false."""

    model_type: str
    built: bool
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str  # the text config's model type
    module: str  # transformers.models.<module>
    lm_class: str  # a ``...ForCausalLM``, or a ``...TextModel`` that gets a language-model head
    wrap: bool


def moe_model_types() -> list[str]:
    """One ``model_type`` per MoE family of the installed transformers, sorted.

    Rule: a ``transformers.models.<module>`` is a family when its modeling file is MoE (an experts
    class decorated with ``use_experts_implementation``, or a routed-expert count and a top-k read
    from the config). Its model type is the config type of the module's ``...ForCausalLM`` class
    (for multimodal families that is the ``*_text`` type, e.g. ``gemma4_text``, ``qwen3_5_moe_text``;
    such classes are in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` or, like ``mistral4``, only in the
    image-text mapping). Without one, the module's decoder ``...TextModel`` (one whose ``forward``
    takes ``use_cache``) is the backbone and its config type counts (``glm4v_moe_text``,
    ``qwen3_vl_moe_text``...); it is built with a linear LM head. Vision/audio sub-configs, encoder-
    decoders (Switch, NLLB-MoE), bidirectional encoders (OpenAI privacy filter) and the block-
    diffusion Gemma have neither and are not counted.
    """
    return sorted(_families())


def tiny_config(model_type: str) -> PretrainedConfig:
    """The shrunk default config of ``model_type``'s text causal LM (see the module docstring)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = _family(model_type)
    config_class = CONFIG_MAPPING[family.model_type]
    defaults = config_class().to_dict()
    shrunk = _shrink(defaults)
    for name, value in _FAMILY_OVERRIDES.get(family.model_type, {}).items():
        shrunk[name] = value(shrunk) if callable(value) else value
    config = config_class.from_dict(shrunk)
    config.name_or_path = f"tiny:{family.model_type}"
    return config


def build_tiny_model(model_type: str, *, seed: int = 0) -> torch.nn.Module:
    """The tiny text causal LM of ``model_type``: float32, eval mode, weights fixed by ``seed``.

    Routers that transformers initialises to zero (``_init_weights`` zeroes e.g. AFMoE's gate and
    every DeepSeek-V3-style ``e_score_correction_bias``) would route every token identically, so
    all-zero router weights get N(0, 0.5/sqrt(hidden)) values, all-zero router bias vectors small
    N(0, 0.1) values and all-zero token->expert hash tables random expert ids (see
    :func:`_randomise_zero_routers`).
    """
    import torch

    family = _family(model_type)
    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # ``_from_config`` is what ``AutoModelForCausalLM.from_config`` calls; using the class
        # directly also covers causal LMs that are only registered as image-text models (Mistral-4)
        # and the wrapped text backbones.
        model = _lm_class(family)._from_config(config, dtype=torch.float32)
        _randomise_zero_routers(model, config, seed)
    return model.eval()


def survey() -> list[FamilyBuild]:
    """Build every family of :func:`moe_model_types`, run a padded forward and a greedy generate."""
    import torch
    from transformers.utils import logging

    input_ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding in the first row
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # generation-config and kernel-fallback warnings are noise here
    results = []
    try:
        for model_type in moe_model_types():
            try:
                model = build_tiny_model(model_type)
                with torch.no_grad():
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                    if logits.shape[:2] != input_ids.shape or not torch.isfinite(logits[1]).all():
                        raise ValueError(f"bad logits: shape {tuple(logits.shape)}, finite {logits.isfinite().all()}")
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=3, do_sample=False)
                    if out.shape != (2, 10):
                        raise ValueError(f"generate returned shape {tuple(out.shape)}")
                results.append(FamilyBuild(model_type, True))
            except Exception as error:  # noqa: BLE001 - any failure is a survey finding
                results.append(FamilyBuild(model_type, False, _reason(error)))
    finally:
        logging.set_verbosity(verbosity)
    return results


# --- family discovery ---------------------------------------------------------------------------


@functools.cache
def _families() -> dict[str, _Family]:
    import transformers.models
    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.models.__path__[0])
    families = {}
    for module in sorted({model_type_to_module_name(t) for t in CONFIG_MAPPING_NAMES}):
        path = root / module / f"modeling_{module}.py"
        source = path.read_text() if path.exists() else ""
        if not (_DECORATOR.search(source) or (_EXPERT_COUNT.search(source) and _TOP_K.search(source))):
            continue
        namespace = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        classes = [c for c in vars(namespace).values() if inspect.isclass(c) and issubclass(c, PreTrainedModel)
                   and c.__module__ == namespace.__name__]
        causal = [c for c in classes if c.__name__.endswith("ForCausalLM")]
        backbones = [c for c in classes if c.__name__.endswith("TextModel")
                     and "use_cache" in inspect.signature(c.forward).parameters]
        if causal or backbones:
            lm_class = (causal or backbones)[0]
            model_type = lm_class.config_class.model_type
            if model_type in CONFIG_MAPPING_NAMES:
                families[model_type] = _Family(model_type, module, lm_class.__name__, wrap=not causal)
    return families


def _family(model_type: str) -> _Family:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    families = _families()
    if model_type in families:
        return families[model_type]
    # A multimodal or sub-config type resolves to its module's text causal LM.
    module = model_type_to_module_name(model_type)
    for family in families.values():
        if family.module == module:
            return family
    raise KeyError(f"{model_type!r} is not an MoE model type; known: {', '.join(sorted(families))}")


def _lm_class(family: _Family) -> type:
    namespace = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    cls = getattr(namespace, family.lm_class)
    return _with_lm_head(cls) if family.wrap else cls


@functools.cache
def _with_lm_head(backbone: type) -> type:
    """A causal LM made of ``backbone`` (a decoder ``...TextModel``) and an untied linear head."""
    import torch
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The family's own PreTrainedModel base brings its ``_init_weights`` (router and bias inits).
    base = next(c for c in backbone.__mro__[1:] if issubclass(c, PreTrainedModel) and c.__module__ == backbone.__module__)

    class TextForCausalLM(base, GenerationMixin):
        config_class = backbone.config_class
        base_model_prefix = "model"

        def __init__(self, config):
            super().__init__(config)
            self.model = backbone(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden = outputs.last_hidden_state
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=outputs.cache)

    TextForCausalLM.__name__ = TextForCausalLM.__qualname__ = backbone.__name__.replace("TextModel", "TextForCausalLM")
    return TextForCausalLM


# --- the shrink rules ---------------------------------------------------------------------------
Rule = Callable[[Any], Any]


def _pos(value: Any) -> Rule:
    """Replace a positive number; keep 0, None and negatives, which mean "off" or "derive it"."""
    return lambda old: value if isinstance(old, (int, float)) and not isinstance(old, bool) and old > 0 else old


def _set(value: Any) -> Rule:
    """Replace whatever is there, None included (e.g. Gemma-4 leaves its expert count None)."""
    return lambda old: value


def _flag(value: bool) -> Rule:
    return lambda old: value if isinstance(old, bool) else old


# Attribute names -> rule, applied wherever the name occurs (top level, sub-config dicts such as
# DBRX's ``ffn_config``, per-layer override dicts) and element-wise to lists (Laguna's per-layer
# head counts, ERNIE-VL's text/vision expert sizes).
_RULES: tuple[tuple[tuple[str, ...], Rule], ...] = (
    (("hidden_size", "d_model"), _pos(HIDDEN_SIZE)),
    (("num_attention_heads", "n_heads", "swa_num_attention_heads", "num_sliding_attention_heads",
      "num_attention_heads_per_layer"), _pos(4)),
    (("num_key_value_heads", "kv_n_heads", "swa_num_key_value_heads"), _pos(2)),
    (("head_dim", "swa_head_dim", "kv_channels", "query_pre_attn_scalar"), _pos(16)),
    (("intermediate_size", "ffn_hidden_size", "dense_intermediate_size", "intermediate_size_mlp",
      "prefix_dense_intermediate_size"), _pos(96)),
    (("moe_intermediate_size", "expert_ffn_hidden_size", "moe_hidden_size"), _set(32)),
    (("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
      "share_expert_dim", "shared_experts_intermediate_size"), _pos(48)),
    # routing
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), _set(N_EXPERTS)),
    (("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k"), _set(TOP_K)),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), _pos(1)),
    (("zero_expert_num",), _pos(4)),
    (("n_group", "num_expert_group"), lambda old: 4 if isinstance(old, int) and old > 1 else old),
    (("topk_group",), lambda old: 2 if isinstance(old, int) and old > 1 else old),
    (("enable_moe_block", "is_moe"), _flag(True)),
    (("router_hidden_size",), _pos(32)),
    # multi-head latent attention; ``qk_head_dim`` and tied ``head_dim`` follow in ``_make_consistent``
    (("kv_lora_rank", "o_lora_rank"), _pos(16)),
    (("q_lora_rank",), _pos(24)),
    (("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), _pos(8)),
    (("v_head_dim",), _pos(16)),
    (("o_groups",), _pos(2)),
    # sparse-attention indexers and compressed attention
    (("index_n_heads", "indexer_n_heads"), _pos(2)),
    (("index_head_dim", "indexer_head_dim"), _pos(16)),
    (("index_topk", "index_block_size"), _pos(4)),
    (("index_topk_blocks", "index_kpool"), _pos(2)),
    (("compress_rates",), lambda old: {k: max(2, r // 32) for k, r in old.items()} if isinstance(old, dict) else old),
    # state-space and linear attention
    (("mamba_n_heads", "mamba_num_heads"), _pos(8)),
    (("mamba_d_head", "mamba_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"), _pos(16)),
    (("mamba_d_state", "ssm_state_size", "mamba_chunk_size", "chunk_size", "block_size"), _pos(16)),
    (("mamba_dt_rank",), _pos(8)),
    (("n_groups", "mamba_n_groups"), lambda old: 2 if isinstance(old, int) and old > 1 else old),
    (("linear_num_heads", "linear_num_value_heads"), _pos(4)),
    (("linear_num_key_heads",), _pos(2)),
    (("use_mamba_kernels",), _flag(False)),  # CUDA kernels; the torch path is what runs on CPU
    # local attention: a window shorter than the survey's prompts so that it actually masks
    (("sliding_window", "sliding_window_size", "keep_window_size", "attention_chunk_size"), _pos(4)),
    # other widths
    (("hidden_size_per_layer_input", "loop_gate_rank"), _pos(8)),
    (("hc_lowrank",), _pos(16)),
    (("ple_embed_dim",), _pos(HIDDEN_SIZE)),
    (("vocab_size", "vocab_size_per_layer_input"), _pos(VOCAB_SIZE)),
    (("unpadded_vocab_size",), _pos(VOCAB_SIZE - 10)),  # keeps the padded-vocabulary masking path
    (("ngram_vocab_size_base",), _pos(1024)),
    (("max_position_embeddings", "max_seq_len", "model_max_length"), _pos(512)),
    # multi-token prediction and cross-layer KV sharing need more layers than a tiny model has
    (("num_nextn_predict_layers", "num_mtp_layers", "num_kv_shared_layers"), _pos(0)),
    (("tie_word_embeddings",), _flag(False)),
)
_RULE_BY_NAME: dict[str, Rule] = {name: rule for names, rule in _RULES for name in names}

_LAYER_COUNTS = ("num_hidden_layers", "n_layers", "num_layers")
# Lists of layer indices (not one entry per layer).
_LAYER_INDEX_SETS = ("mlp_only_layers", "moe_layers", "ple_layer_ids", "local_layer_ids", "mtp_local_layer_ids")
# Per-layer lists whose values are layer indices (Mistral-Large-4's KV sharing source).
_LAYER_INDEX_VALUES = ("kv_source_layers",)
# Scalar layer patterns as the modeling/config code reads them: (names, is-layer-i-marked). They
# choose which layers to keep and are re-fitted to the kept layers (see ``_refit``).
_LAYER_PATTERNS: tuple[tuple[tuple[str, ...], Callable[..., bool]], ...] = (
    (("first_k_dense_replace",), lambda k, i: i >= k),
    (("num_dense_layers",), lambda k, i: i >= k),
    (("decoder_sparse_step",), lambda s, i: (i + 1) % s == 0),
    (("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
     lambda a, b, s, i: (i + 1) % s == 0 and a <= i <= b),
    (("expert_layer_period", "expert_layer_offset"), lambda p, o, i: i % p == o),
    (("attn_layer_period", "attn_layer_offset"), lambda p, o, i: i % p == o),
    (("n_layers_per_attn_res_block",), lambda n, i: i % n == 0),
    (("loop_layer_index_start", "loop_layer_index_end"), lambda a, b, i: a <= i < b),
)

# Per-family overrides, only where no generic rule can work.
_FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # product-key experts: the expert count must be a perfect square (num_keys = sqrt(num_experts))
    "doge": {"num_experts": 16},
}


def _shrink(defaults: dict[str, Any]) -> dict[str, Any]:
    config = _keep_layer_kinds(dict(defaults))
    config = _apply_rules(config)
    _make_consistent(config, defaults)
    return config


def _apply_rules(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in config.items():
        if isinstance(value, dict) and ("model_type" in value or _is_per_layer_dict(value)):
            value = {k: _apply_rules(v) if isinstance(v, dict) else v for k, v in value.items()} \
                if _is_per_layer_dict(value) else _apply_rules(value)
        elif name in _RULE_BY_NAME:
            rule = _RULE_BY_NAME[name]
            value = [rule(v) for v in value] if isinstance(value, list) else rule(value)
        out[name] = value
    return out


def _is_per_layer_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and k.isdigit() for k in value)


def _keep_layer_kinds(config: dict[str, Any]) -> dict[str, Any]:
    """Keep the fewest layers (at least 2) that show every value of every per-layer setting.

    Per-layer settings are lists with one entry per layer (``layer_types``, ``mlp_layer_types``,
    ``layers_block_type``, ``no_rope_layers``...), layer-index lists (``mlp_only_layers``,
    ``moe_layers``), per-layer override dicts keyed by layer number and the scalar patterns of
    ``_LAYER_PATTERNS``. Layers are kept greedily in order, so a dense prefix stays a prefix.
    """
    count_name = next((n for n in _LAYER_COUNTS if isinstance(config.get(n), int)), None)
    if count_name is None:
        return config
    n = config[count_name]
    per_layer = [k for k, v in config.items()
                 if isinstance(v, list) and len(v) == n and k not in _LAYER_INDEX_SETS]
    index_sets = [k for k in _LAYER_INDEX_SETS if isinstance(config.get(k), list)]
    layer_dicts = [k for k, v in config.items() if _is_per_layer_dict(v)]
    patterns = [(names, mark) for names, mark in _LAYER_PATTERNS
                if all(isinstance(config.get(x), int) for x in names)]

    def features(i: int) -> Iterator[tuple[str, str]]:
        for k in per_layer:
            yield k, repr(config[k][i]) if k not in _LAYER_INDEX_VALUES else repr(config[k][i] == i)
        for k in index_sets:
            yield k, repr(i in config[k])
        for k in layer_dicts:
            yield k, repr(next((v for key, v in config[k].items() if int(key) == i), None))
        for names, mark in patterns:
            yield names[0], repr(_marks(mark, [config[x] for x in names], [i]))

    covered: set[tuple[str, str]] = set()
    kept = []
    for i in range(n):
        new = set(features(i)) - covered
        if new:
            kept.append(i)
            covered |= new
    if len(kept) < 2:
        kept = sorted({*kept, *range(min(2, n))})[:2]
    position = {old: new for new, old in enumerate(kept)}

    config[count_name] = len(kept)
    for k in per_layer:
        values = [config[k][i] for i in kept]
        config[k] = [position.get(v, j) for j, v in enumerate(values)] if k in _LAYER_INDEX_VALUES else values
    for k in index_sets:
        config[k] = [position[i] for i in config[k] if i in position]
    for k in layer_dicts:
        width = max(len(key) for key in config[k])
        config[k] = {str(position[int(key)]).zfill(width): v for key, v in config[k].items() if int(key) in position}
    for names, mark in patterns:
        wanted = _marks(mark, [config[x] for x in names], kept)
        if wanted is not None:
            config.update(zip(names, _refit(mark, len(names), wanted)))
    return config


def _marks(mark: Callable[..., bool], params: list[int], layers: list[int]) -> list[bool] | None:
    try:
        return [bool(mark(*params, i)) for i in layers]
    except ZeroDivisionError:  # a period or step of 0: not a valid setting
        return None


def _refit(mark: Callable[..., bool], arity: int, wanted: list[bool]) -> tuple[int, ...]:
    """The smallest parameters (each in 0..len+1) for which ``mark`` reproduces ``wanted``."""
    n = len(wanted)
    for params in itertools.product(range(n + 2), repeat=arity):
        if _marks(mark, list(params), list(range(n))) == wanted:
            return params
    raise ValueError(f"no layer pattern reproduces {wanted}")


def _make_consistent(config: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Re-derive the values that must agree with each other after the independent rules."""
    if config.get("kv_lora_rank"):  # MLA decompresses K and V for every query head
        config["num_key_value_heads"] = config["num_attention_heads"]
    if "qk_head_dim" in config and config.get("qk_nope_head_dim") is not None:
        config["qk_head_dim"] = config["qk_nope_head_dim"] + (config.get("qk_rope_head_dim") or 0)
    if defaults.get("head_dim") and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        config["head_dim"] = config["qk_rope_head_dim"]  # MLA configs name the rotary part head_dim

    experts = next((config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
                    if isinstance(config.get(k), int)), None)
    group_key = next((k for k in ("n_group", "num_expert_group") if isinstance(config.get(k), int)), None)
    top_key = next((k for k in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")
                    if isinstance(config.get(k), int)), None)
    if experts and group_key:
        groups = math.gcd(config[group_key], experts)
        config[group_key] = groups
        if isinstance(config.get("topk_group"), int):
            config["topk_group"] = min(config["topk_group"], groups)
            if top_key:
                config[top_key] = min(config[top_key], config["topk_group"] * experts // groups)
    if experts and top_key:
        config[top_key] = min(config[top_key], experts)

    _rescale_mrope(config, defaults)
    used = set(_SPECIAL_IDS.values())
    spare = iter(range(VOCAB_SIZE - 1, 0, -1))
    for name, value in config.items():
        if name.endswith("_token_id") and isinstance(value, int) and value >= VOCAB_SIZE:
            config[name] = _SPECIAL_IDS.get(name) or next(i for i in spare if i not in used)
        elif name.endswith("_token_id") and isinstance(value, list):
            config[name] = [v if v < VOCAB_SIZE else _SPECIAL_IDS.get(name, 2) for v in value]


def _rescale_mrope(config: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Multimodal RoPE splits the rotary half-dimension into sections; scale them to the new size."""
    for rope in _rope_dicts(config.get("rope_parameters")):
        section = rope.get("mrope_section")
        if not section:
            continue
        old_dim = defaults.get("qk_rope_head_dim") or defaults.get("head_dim") or \
            defaults["hidden_size"] // defaults["num_attention_heads"]
        new_dim = config.get("qk_rope_head_dim") or config.get("head_dim") or \
            config["hidden_size"] // config["num_attention_heads"]
        target = sum(section) * new_dim // old_dim
        scaled = [max(1, s * target // sum(section)) for s in section]
        scaled[0] += target - sum(scaled)
        rope["mrope_section"] = scaled


def _rope_dicts(rope: Any) -> Iterator[dict]:
    if isinstance(rope, dict):
        yield rope
        for value in rope.values():
            if isinstance(value, dict):
                yield value


# --- routers ------------------------------------------------------------------------------------
_ROUTER_CLASS = re.compile(r"Router|Gate|Gating|TopK", re.IGNORECASE)
_ROUTER_ATTRIBUTE = re.compile(r"(^|_)(router|gate)$")


def _randomise_zero_routers(model: torch.nn.Module, config: PretrainedConfig, seed: int) -> None:
    """Give all-zero router tensors random values (see :func:`build_tiny_model`).

    A router is a module whose class name contains Router/Gate/Gating/TopK or whose attribute name
    is ``router``/``gate``; its 2-D weights with ``hidden`` input columns are the expert logits, its
    1-D float tensors are logit or selection biases and its 2-D integer tables map tokens to experts.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    hidden = config.hidden_size
    with torch.no_grad():
        for name, module in model.named_modules():
            attribute = name.rsplit(".", 1)[-1]
            if not (_ROUTER_CLASS.search(type(module).__name__) or _ROUTER_ATTRIBUTE.search(attribute)):
                continue
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.numel() == 0 or tensor.any():
                    continue
                if tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[1] == hidden:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.5 / hidden**0.5))
                elif tensor.is_floating_point() and tensor.dim() == 1:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
                elif not tensor.is_floating_point() and tensor.dim() == 2:
                    experts = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", N_EXPERTS)
                    tensor.copy_(torch.randint(0, experts, tensor.shape, generator=generator))


def _reason(error: BaseException) -> str:
    """``Type: first line of the message [at transformers/<file>:<line> in <function>]``."""
    message = (str(error).strip().splitlines() or [""])[0][:160]
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/transformers/" in f.filename]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" [at {frame.filename.split('/transformers/', 1)[1]}:{frame.lineno} in {frame.name}]"
    return f"{type(error).__name__}: {message}{where}"
