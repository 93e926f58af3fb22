"""Seeded, randomly initialised tiny models of nine hand-configured families (``tiny:<family>``).

These are the fixtures of the main test suite; every other MoE family of the installed
transformers gets a tiny model from the generic shrinker (:mod:`moelens.zoo.shrink`).

They exercise the exact transformers code path of each family (shared experts, dense leading
layers, group-limited routing, router biases) at a size that runs in milliseconds on a CPU. Random
weights carry no specialization: use them for plumbing and exactness, never for findings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# family -> (config class name, family-specific config). Layer counts, expert counts and the
# placement of dense layers vary on purpose so that layer/expert bookkeeping is exercised.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=3,
            head_dim=16,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            num_key_value_heads=4,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_hidden_layers=2,
            head_dim=16,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
}

TINY_FAMILIES: tuple[str, ...] = tuple(TINY_CONFIGS)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ``<bos>``, ``<eos>``, ``<pad>``) that adds ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_symbols))}
    specials = ["<bos>", "<eos>", "<pad>"]
    for token in specials:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )


def build_tiny(family: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A deterministic random tiny model of ``family`` (same seed, same weights) and its tokenizer."""
    import torch
    import transformers

    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny model for family {family!r}; available: {', '.join(TINY_FAMILIES)}")
    tokenizer = build_byte_tokenizer()
    class_name, specific = TINY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        **{**_COMMON, **specific},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.name_or_path = f"tiny:{family}"
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomise_zero_initialised(model, seed)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, tokenizer


def _randomise_zero_initialised(model: Any, seed: int) -> None:
    """Give routers and router biases random values where transformers initialises them to zero.

    Some families zero-initialise router weights or score-correction biases; with zeros every
    token routes identically and tie-breaking, not routing, would be what tests observe.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            is_router = any(part in name for part in (".gate.", ".router.")) and leaf in ("weight", "bias")
            if is_router or leaf == "e_score_correction_bias":
                if tensor.dtype.is_floating_point and not tensor.any():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
