"""A Hugging Face checkpoint becomes the start of a sharded job: ``save_pretrained`` of a
random-init tiny Llama (tied embeddings) -> ``ckpt import hf`` -> 4 gloo ranks each holding an
FSDP2 shard of the model load it with ``ckpt.load`` (strict: every name of the state dict,
the tied one too) and compute the same logits as the original model."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
from ckpt.cli import main

from ._checks import assert_bitexact
from ._multiproc import run_distributed

pytest.importorskip("transformers")

CONFIG = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": True}


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def fsdp_load_worker(rank: int, world: int, run: str, reference: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = torch.load(reference, weights_only=True)
    torch.manual_seed(1000 + rank)  # other weights everywhere: the load must win
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": get_model_state_dict(model)}
    assert isinstance(state["model"]["model.embed_tokens.weight"], DTensor)
    assert ckpt.load(state, run) == 1
    set_model_state_dict(model, state["model"])
    for name, t in get_model_state_dict(model).items():
        assert_bitexact(t.full_tensor(), ref["state"][name], f"rank {rank}: {name}")
    with torch.no_grad():
        logits = model(_ids()).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-6, atol=1e-6)


def test_import_hf_then_fsdp2_on_four_ranks(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(str(tmp_path / "pretrained"), max_shard_size="20KB")
    assert main(["import", "hf", str(tmp_path / "pretrained"), str(tmp_path / "run"), "--step", "1"]) == 0
    capsys.readouterr()
    with torch.no_grad():
        ref = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": model(_ids()).logits}
    torch.save(ref, tmp_path / "reference.pt")
    run_distributed(fsdp_load_worker, 4, str(tmp_path / "run"), str(tmp_path / "reference.pt"), tmp_path=tmp_path,
                    timeout=240)
