"""Hugging Face folders with the real transformers, random-init models from configs (nothing
downloaded): a tiny Llama (tied and untied embeddings) and GPT-2 (tied).

- ``ckpt.save({"model": model.state_dict()})`` -> ``ckpt export --format hf`` (sharded) ->
  ``from_pretrained``: identical logits, tied weights written once;
- ``save_pretrained`` (sharded and not) -> ``ckpt import hf`` -> ``ckpt.load`` into a fresh
  model: identical logits, the tied names ``model.state_dict()`` has restored.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt
from ckpt.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    return {
        "llama-tied": (LlamaForCausalLM, LlamaConfig(**llama, tie_word_embeddings=True)),
        "llama-untied": (LlamaForCausalLM, LlamaConfig(**llama, tie_word_embeddings=False)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)),
    }


def _logits(model, seed=3):
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gpt2"])
def test_export_hf_then_from_pretrained(tmp_path, capsys, name):
    cls, config = _models()[name]
    torch.manual_seed(0)
    model = cls(config)
    ckpt.save({"model": model.state_dict(), "step": 5}, str(tmp_path / "run"), step=5)
    config.save_pretrained(str(tmp_path / "cfg"))
    out = tmp_path / "hf"
    code = main(["export", str(tmp_path / "run"), "--format", "hf", str(out), "--config",
                 str(tmp_path / "cfg" / "config.json"), "--max-shard-size", "20KB", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result["files"]) > 2 and set(index["weight_map"].values()) == set(result["files"][:-1])
    tied = config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert result["tied_left_out"] == (["lm_head.weight"] if tied else [])
    loaded = cls.from_pretrained(str(out))
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("name,shard", [("llama-tied", "20KB"), ("llama-untied", None), ("gpt2", "20KB")])
def test_save_pretrained_then_import_then_load(tmp_path, capsys, name, shard):
    cls, config = _models()[name]
    torch.manual_seed(0)
    model = cls(config)
    src = tmp_path / "pretrained"
    model.save_pretrained(str(src), **({"max_shard_size": shard} if shard else {}))
    assert ("model.safetensors.index.json" in os.listdir(src)) == bool(shard)
    code = main(["import", "hf", str(src), str(tmp_path / "run"), "--step", "1"])
    capsys.readouterr()
    assert code == 0
    torch.manual_seed(99)
    fresh = cls(config)
    state = {"model": fresh.state_dict()}
    ckpt.load(state, str(tmp_path / "run"))  # strict: every name of the state dict, tied ones too
    assert torch.equal(_logits(fresh), _logits(model))
    manifest = ckpt.read_manifest(ckpt.open_storage(str(tmp_path / "run")))
    assert manifest.layout == "shards" and manifest.user_metadata["hf"]["config"]["model_type"] == config.model_type
    # ... and out again: the config the import kept makes the folder loadable as it is.
    code = main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "again")])
    capsys.readouterr()
    assert code == 0 and torch.equal(_logits(cls.from_pretrained(str(tmp_path / "again"))), _logits(model))
