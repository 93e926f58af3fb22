"""Family adapters and loading: every family's MoE layers, and clear errors for everything else."""

from __future__ import annotations

import pytest
import torch
import transformers

import moelens
from moelens.cli import main
from moelens.hooks.adapters import UnsupportedModelError, moe_layers
from moelens.loading import ModelNotFoundError
from moelens.zoo.tiny import TINY_CONFIGS


def test_moe_layers_follow_the_config(tiny):
    model, _ = tiny
    config = model.config
    layers = moe_layers(model)
    dense = set(getattr(config, "mlp_only_layers", []) or []) | set(range(getattr(config, "first_k_dense_replace", 0) or 0))
    assert [layer.index for layer in layers] == [i for i in range(config.num_hidden_layers) if i not in dense]
    for layer in layers:
        assert layer.router in list(layer.block.children()) and layer.experts in list(layer.block.children())
        assert layer.num_experts == getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None) or config.num_local_experts
        assert layer.top_k == config.num_experts_per_tok
        has_shared = bool(getattr(config, "n_shared_experts", 0) or getattr(config, "shared_expert_intermediate_size", 0))
        assert (layer.shared is not None) == has_shared


def test_tiny_models_are_deterministic(family):
    a, tokenizer = moelens.load(f"tiny:{family}")
    b, _ = moelens.load(f"tiny:{family}")
    ids = tokenizer(["same seed, same weights"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**ids).logits, b(**ids).logits)
    assert tokenizer.convert_ids_to_tokens(ids["input_ids"][0, :1].tolist()) == [tokenizer.bos_token]


def test_a_family_without_a_table_entry_is_found_by_structure():
    config = transformers.Ernie4_5_MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == [1]  # Ernie 4.5's first layer is dense
    assert layers[0].router is model.model.layers[1].mlp.gate and layers[0].experts is model.model.layers[1].mlp.experts
    assert layers[0].shared is model.model.layers[1].mlp.shared_experts
    assert (layers[0].num_experts, layers[0].top_k) == (config.moe_num_experts, config.moe_k)


def test_a_dense_model_is_refused():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="No module looks like an MoE router, so it is probably a dense model"):
        moe_layers(transformers.AutoModelForCausalLM.from_config(config))


def test_a_family_configured_without_moe_layers_is_refused():
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64, num_experts=4, mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedModelError, match="has no MoE layers.*mlp_only_layers"):
        moe_layers(transformers.AutoModelForCausalLM.from_config(config))


def test_load_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no directory .* exists and it is not a hub id"):
        moelens.load(tmp_path / "missing" / "model")  # hub ids: tests/test_large_models.py
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        moelens.load(tmp_path)
    with pytest.raises(KeyError, match="no tiny model for family 'llama'"):
        moelens.load("tiny:llama")


def test_zoo_save_writes_a_plain_checkpoint(tmp_path, capsys):
    assert main(["zoo", "save", "tiny:deepseek_v3", str(tmp_path / "ckpt")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    original, tokenizer = moelens.load("tiny:deepseek_v3")
    again, _ = moelens.load(tmp_path / "ckpt")
    ids = tokenizer(["round trip"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, original(**ids).logits)
        assert torch.equal(again(**ids).logits, original(**ids).logits)
    assert main(["zoo", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "moelens-tiny" in listed and "tiny:gpt_oss" in listed


def test_every_moelens_error_has_one_base_and_keeps_its_builtin_kind():
    import inspect

    import moelens.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == "moelens.errors"]
    assert len(classes) >= 10
    for error in classes:
        assert issubclass(error, moelens.MoelensError)
        if error is not moelens.MoelensError:
            assert issubclass(error, (ValueError, RuntimeError, FileNotFoundError)), error
    with pytest.raises(moelens.MoelensError, match="has no MoE layers"):
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        moe_layers(transformers.AutoModelForCausalLM.from_config(config))
