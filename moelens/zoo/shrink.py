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
import inspect
import itertools
import math
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelens.store import EXPERT_COUNT_KEYS

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

VOCAB_SIZE = 300
HIDDEN_SIZE = 64
DENSE_WIDTH = 96  # dense MLP intermediate size
EXPERT_WIDTH = 32  # routed expert intermediate size
SHARED_WIDTH = 48  # shared experts, and experts whose width is the dense intermediate_size
N_EXPERTS = 8
TOP_K = 2
# Special tokens land outside the ids the survey feeds (3..249), so they never collide with text.
_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# --- which modeling files are MoE --------------------------------------------------------------
# A modeling file is MoE when it decorates an experts class with ``use_experts_implementation`` or
# reads both a routed-expert count and a per-token expert count from its config (DBRX, JetMoE,
# Llama-4, LongCat, Doge predate the decorator).
_TOP_KS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k")
_EXPERT_WIDTHS = ("moe_intermediate_size", "expert_ffn_hidden_size", "moe_hidden_size")
_DECORATOR = re.compile(r"@use_experts_implementation")
_EXPERT_COUNT = re.compile(rf"\.({'|'.join(EXPERT_COUNT_KEYS)})\b")
_TOP_K = re.compile(rf"\.({'|'.join(_TOP_KS)})\b")


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
    defaults = _with(config_class().to_dict(), _FAMILY_DEFAULTS.get(family.model_type, {}))
    mrope = "mrope_section" in getattr(config_class, "ignore_keys_at_rope_validation", ())
    shrunk = _with(_shrink(defaults, mrope=mrope), _FAMILY_OVERRIDES.get(family.model_type, {}))
    config = config_class.from_dict(shrunk)
    config.name_or_path = f"tiny:{family.model_type}"
    return config


def build_tiny_model(model_type: str, *, seed: int = 0) -> torch.nn.Module:
    """The tiny text causal LM of ``model_type``: float32, eval mode, weights fixed by ``seed``.

    Routers that transformers initialises to zero (``_init_weights`` zeroes e.g. AFMoE's gate and
    every DeepSeek-V3-style ``e_score_correction_bias``) would route every token identically, so
    all-zero router weights get N(0, 0.5/sqrt(hidden)) values, all-zero router bias vectors small
    N(0, 0.1) values and all-zero token->expert hash tables random expert ids (see
    :func:`_randomise_router_state`).
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
        _randomise_router_state(model, config, seed)
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
                    if logits.shape[:2] != input_ids.shape or not torch.isfinite(logits).all():
                        raise ValueError(f"logits of shape {tuple(logits.shape)}, all finite: "
                                         f"{bool(torch.isfinite(logits).all())}")
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=3, do_sample=False)
                    if out.shape[0] != 2 or out.shape[1] <= input_ids.shape[1]:  # an early EOS may stop it
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
    base = next(c for c in backbone.__mro__[1:]
                if issubclass(c, PreTrainedModel) and c.__module__ == backbone.__module__)

    class TextForCausalLM(base, GenerationMixin):
        # transformers decides from the defining module's source whether the experts/attention
        # implementation can be switched, so the head must answer like its backbone does.
        __module__ = backbone.__module__
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

    TextForCausalLM.__name__ = backbone.__name__.replace("TextModel", "TextForCausalLM")
    TextForCausalLM.__qualname__ = TextForCausalLM.__name__
    return TextForCausalLM


# --- the shrink rules ---------------------------------------------------------------------------
Rule = Callable[[Any], Any]


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _pos(value: Any) -> Rule:
    """Replace a positive number; keep 0, None and negatives, which mean "off" or "derive it"."""
    return lambda old: value if _is_positive(old) else old


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
    # ``None`` head_dim means hidden/heads, which is 16 too; Hunyuan reads it without that fallback
    (("head_dim",), lambda old: 16 if old is None or _is_positive(old) else old),
    (("swa_head_dim", "kv_channels", "query_pre_attn_scalar"), _pos(16)),
    (("intermediate_size", "ffn_hidden_size", "dense_intermediate_size", "intermediate_size_mlp",
      "prefix_dense_intermediate_size"), _pos(DENSE_WIDTH)),
    (_EXPERT_WIDTHS, _set(EXPERT_WIDTH)),  # MuseSpark's moe_hidden_size: the experts' latent input width
    (("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
      "share_expert_dim", "shared_experts_intermediate_size"), _pos(SHARED_WIDTH)),
    # routing
    (EXPERT_COUNT_KEYS, _set(N_EXPERTS)),
    (_TOP_KS, _set(TOP_K)),
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
    # DeepSeek-V4 compresses KV by 4 and 128 tokens: 2 and 4 still compress a 10-token prompt
    (("compress_rates",), lambda old: {k: max(2, r // 32) for k, r in old.items()} if old else old),
    # state-space and linear attention
    (("mamba_n_heads", "mamba_num_heads"), _pos(8)),
    (("mamba_d_head", "mamba_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"),
     _pos(16)),
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
_LAYER_INDEX_SETS = ("mlp_only_layers", "moe_layers")
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

# Per-family settings, only where no generic rule can work. Values are constants or functions of
# the config dict. ``_FAMILY_DEFAULTS`` complete a default config that its own modeling code cannot
# build (checkpoints always set these) and are applied before shrinking, so they get shrunk and
# their layer kinds kept; ``_FAMILY_OVERRIDES`` are applied to the shrunk config.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig no longer defines, and
    # clamps Q/K/V with clip_qkv, whose default None makes torch.clamp fail
    "dbrx": {"attn_config": lambda c: {**c["attn_config"], "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # the decoder layer indexes mlp_layer_types, which defaults to None
    "deepseek_ocr2_text": {"mlp_layer_types": lambda c: ["dense"] + ["sparse"] * (c["num_hidden_layers"] - 1)},
    # the MoE block always builds a shared expert of moe_intermediate_size * n_shared_experts (None)
    "dots1": {"n_shared_experts": 1},
    # the default stack is all Mamba, and a cache without attention layers fails get_seq_length()
    "granitemoehybrid": {"layer_types": lambda c: ["full_attention" if i % 4 == 3 else "linear_attention"
                                                   for i in range(c["num_hidden_layers"])]},
    # layer_types defaults to None but every decoder layer indexes it ("conv" or attention)
    "lfm2_moe": {"layer_types": lambda c: ["full_attention" if i % 4 == 3 else "conv"
                                           for i in range(c["num_hidden_layers"])]},
    # its default layer_types use indexed attention but leave the indexer (QSA) unset; already
    # tiny, so that the index selects within a 10-token prompt
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 4, "indexer_compress_ratio": 2},
    # the text model always builds a sliding-window mask, which needs a window (default None)
    "step3p5": {"sliding_window": 512},
}
_FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # product-key experts: the expert count must be a perfect square (num_keys = sqrt(num_experts))
    "doge": {"num_experts": 16},
    # the sliding layers' overrides widen qk_nope_head_dim, and the sliding head_dim must equal it
    # plus the rotary part (validated); the generic rules shrink the two by different factors
    "dots3_note_text": {"head_dim": lambda c: c["qk_rope_head_dim"]
                        + next(iter(c["per_layer_config"].values()))["qk_nope_head_dim"]},
    # the loop bounds must be multiples of the attention-residual block length, and the kept
    # layers' block boundaries and loop bounds admit no common length above 1
    "inkling2_loop_text": {"n_layers_per_attn_res_block": 1},
    # its config validation accepts top-1 routing only
    "zaya": {"num_experts_per_tok": 1},
}


def _with(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {**config, **{k: v(config) if callable(v) else v for k, v in settings.items()}}


def _shrink(defaults: dict[str, Any], *, mrope: bool) -> dict[str, Any]:
    """Keep the layer kinds, apply ``_RULES``, then restore the values that must agree.

    ``mrope``: the modeling code splits the rotary dimensions into (temporal, height, width)
    sections, with a built-in default when the config has none.
    """
    config = _apply_rules(_keep_layer_kinds(dict(defaults)))
    _make_consistent(config, defaults, mrope=mrope)
    return config


def _apply_rules(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in config.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (DBRX's attn/ffn_config)
            value = _apply_rules(value)
        elif name in _RULE_BY_NAME:
            rule = _RULE_BY_NAME[name]
            value = [rule(v) for v in value] if isinstance(value, list) else rule(value)
        out[name] = value
    for name, value in config.items():  # after the globals, which per-layer overrides scale with
        if _is_per_layer_dict(value):
            out[name] = {layer: _scale_like(override, config, out) for layer, override in value.items()}
    return out


def _scale_like(override: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A per-layer override scaled like the global value it overrides (Dots3's wider MLA layers,
    Gemma-4's 2x head_dim on global layers); the same constant would erase the difference."""
    scaled = {}
    for name, value in override.items():
        old, new = before.get(name), after.get(name)
        if _is_positive(value) and _is_positive(old) and _is_positive(new) and isinstance(value, int):
            scaled[name] = max(1, round(new * value / old))
        else:
            scaled[name] = _RULE_BY_NAME.get(name, lambda v: v)(value)
    return scaled


def _is_per_layer_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and k.isdigit() for k in value)


def _keep_layer_kinds(config: dict[str, Any]) -> dict[str, Any]:
    """Keep the fewest layers (at least 2) that show every value of every per-layer setting.

    Per-layer settings are lists with one entry per layer (``layer_types``, ``mlp_layer_types``,
    ``layers_block_type``, ``no_rope_layers``...), layer-index lists (``mlp_only_layers``,
    ``moe_layers``), per-layer override dicts keyed by layer number and the scalar patterns of
    ``_LAYER_PATTERNS``. Kept layers stay in order, so a dense prefix stays a prefix.
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

    def features(i: int) -> Iterator[tuple[str, str]]:  # (setting, this layer's value)
        for k in per_layer:
            yield k, repr(config[k][i]) if k not in _LAYER_INDEX_VALUES else repr(config[k][i] == i)
        for k in index_sets:
            yield k, repr(i in config[k])
        for k in layer_dicts:
            yield k, repr(next((v for key, v in config[k].items() if int(key) == i), None))
        for names, mark in patterns:
            yield names[0], repr(_marks(mark, [config[x] for x in names], [i]))

    # Greedy set cover: take the layer showing the most unseen values (the earliest on ties).
    layer_features = [set(features(i)) for i in range(n)]
    uncovered = set().union(*layer_features)
    chosen = set()
    while uncovered:
        best = max(range(n), key=lambda i: (len(layer_features[i] & uncovered), -i))
        chosen.add(best)
        uncovered -= layer_features[best]
    kept = sorted(chosen)
    if len(kept) < 2:  # a uniform stack (chosen == {0}): still two layers, for layer-to-layer plumbing
        kept = list(range(min(2, n)))
    position = {old: new for new, old in enumerate(kept)}

    config[count_name] = len(kept)
    for k in per_layer:
        values = [config[k][i] for i in kept]
        config[k] = [position.get(v, j) for j, v in enumerate(values)] if k in _LAYER_INDEX_VALUES else values
    for k in index_sets:
        config[k] = [position[i] for i in config[k] if i in position]
    for k in layer_dicts:
        width = max(len(key) for key in config[k])
        config[k] = {str(position[int(key)]).zfill(width): v
                     for key, v in config[k].items() if int(key) in position}
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


def _make_consistent(config: dict[str, Any], defaults: dict[str, Any], *, mrope: bool) -> None:
    """Re-derive the values that must agree with each other after the independent rules."""
    if config.get("kv_lora_rank"):  # MLA decompresses K and V for every query head
        for scope in [config, *(v for d in config.values() if _is_per_layer_dict(d) for v in d.values())]:
            if "num_key_value_heads" in scope:
                scope["num_key_value_heads"] = scope.get("num_attention_heads", config["num_attention_heads"])
    if "qk_head_dim" in config and config.get("qk_nope_head_dim") is not None:
        config["qk_head_dim"] = config["qk_nope_head_dim"] + (config.get("qk_rope_head_dim") or 0)
    if defaults.get("head_dim") and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        config["head_dim"] = config["qk_rope_head_dim"]  # MLA configs name the rotary part head_dim

    if "intermediate_size" in config and not any(k in config for k in _EXPERT_WIDTHS):
        config["intermediate_size"] = SHARED_WIDTH  # it is the experts' width (Mixtral, GPT-OSS, Jamba...)

    # Group-limited routing: groups divide the experts, the kept groups hold at least top-k experts.
    experts = next((config[k] for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    group_key = next((k for k in ("n_group", "num_expert_group") if isinstance(config.get(k), int)), None)
    top_key = next((k for k in _TOP_KS if isinstance(config.get(k), int)), None)
    if experts and group_key:
        groups = math.gcd(config[group_key], experts)
        config[group_key] = groups
        if isinstance(config.get("topk_group"), int):
            config["topk_group"] = min(config["topk_group"], groups)
            if top_key:
                config[top_key] = min(config[top_key], config["topk_group"] * experts // groups)
    if experts and top_key:
        config[top_key] = min(config[top_key], experts)

    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and (mrope or "mrope_section" in rope):
        rope["mrope_section"] = _split(_rotary_dim(config) // 2, rope.get("mrope_section") or [1, 1, 1])

    used = set(_SPECIAL_IDS.values())
    spare = (i for i in range(VOCAB_SIZE - 1, 0, -1) if i not in used)
    for name, value in config.items():
        if name.endswith("_token_id") and isinstance(value, int) and value >= VOCAB_SIZE:
            config[name] = _SPECIAL_IDS.get(name) or next(spare)
        elif name.endswith("_token_id") and isinstance(value, list):
            config[name] = [v if v < VOCAB_SIZE else _SPECIAL_IDS.get(name, 2) for v in value]


def _rotary_dim(config: dict[str, Any]) -> int:
    if config.get("qk_rope_head_dim"):
        return config["qk_rope_head_dim"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor") or \
        config.get("partial_rotary_factor") or 1.0
    return int(head_dim * factor)


def _split(total: int, proportions: list[int]) -> list[int]:
    """``total`` split like ``proportions`` (largest remainders first), e.g. 8 like [24, 20, 20] -> [3, 3, 2]."""
    exact = [total * p / sum(proportions) for p in proportions]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: (parts[i] - exact[i], i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


# --- routers ------------------------------------------------------------------------------------
_ROUTER_CLASS = re.compile(r"Router|Gating|TopK", re.IGNORECASE)
_ROUTER_ATTRIBUTE = re.compile(r"^(router|gate)$")


def _randomise_router_state(model: torch.nn.Module, config: PretrainedConfig, seed: int) -> None:
    """Give all-zero router tensors random values, and all-one per-expert scales random ones in
    [0.5, 1.5) (see :func:`build_tiny_model`).

    Router state is any tensor inside a router module (class name containing Router/Gating/TopK,
    or attribute ``router``/``gate``, which finds HunYuan's ``...Gate``) or held directly by an MoE
    block (a module with an ``experts`` child: AFMoE's and LFM2's ``expert_bias``, HY-V3's score
    correction), and sized by the expert count. Null/zero experts count: ``E + 1`` (ZAYA, Inkling)
    and ``E + zero_expert_num`` (LongCat). Linear-attention forget gates and gated norms are not
    routers and keep their zero-initialised parameters (e.g. GLM-5-Next's ``A_log``).
    """
    import torch

    settings = _flat_settings(config.to_dict())
    experts = next(settings[k] for k in EXPERT_COUNT_KEYS if isinstance(settings.get(k), int))
    sizes = {experts, experts + 1, experts + (settings.get("zero_expert_num") or 0)}
    routers = {name for name, module in model.named_modules()
               if _ROUTER_CLASS.search(type(module).__name__) or _ROUTER_ATTRIBUTE.search(name.rsplit(".", 1)[-1])}
    blocks = {name for name, module in model.named_modules()
              if isinstance(getattr(module, "experts", None), torch.nn.Module)}
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            owner = name.rsplit(".", 1)[0]
            in_router = any(owner == r or owner.startswith(r + ".") for r in routers)
            if not (in_router or owner in blocks) or tensor.numel() == 0:
                continue
            if tensor.is_floating_point() and tensor.numel() in sizes and bool((tensor == 1).all()):
                # per-expert weight scales (Gemma 4) start at one; trained ones do not, and a rule
                # check on all-ones scales could not tell a rule that ignores them
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                continue
            if tensor.any():
                continue
            if tensor.is_floating_point() and tensor.numel() in sizes:
                # selection biases (score correction, expert bias): small next to the logits
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[0] in sizes:
                # expert logits W @ h: |h| ~ sqrt(hidden), so the logits get a std of ~0.5
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.5 / tensor.shape[1] ** 0.5))
            elif not tensor.is_floating_point() and tensor.dim() == 2:
                # token -> expert hash table (DeepSeek-V4): distinct experts for every token
                ranks = torch.rand(tensor.shape[0], experts, generator=generator).argsort(dim=1)
                tensor.copy_(ranks[:, : tensor.shape[1]])


def _flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Top-level settings plus those of sub-config dicts (DBRX keeps its experts in ``ffn_config``)."""
    nested = [v for v in config.values() if isinstance(v, dict) and "model_type" in v]
    return {k: v for sub in [*nested, config] for k, v in sub.items()}


def _reason(error: BaseException) -> str:
    """``Type: first line of the message [at transformers/<file>:<line> in <function>]``."""
    # Config validators wrap the real cause: "Class validation error for validator '...':".
    first_line = (str(error).strip().splitlines() or [""])[0]
    shown = error.__cause__ if error.__cause__ is not None and first_line.endswith(":") else error
    message = f"{type(shown).__name__}: " + (str(shown).strip().splitlines() or [""])[0][:160]
    frames = [f for f in traceback.extract_tb(shown.__traceback__) if "/transformers/" in f.filename]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" [at {frame.filename.split('/transformers/', 1)[1]}:{frame.lineno} in {frame.name}]"
    return f"{message}{where}"
