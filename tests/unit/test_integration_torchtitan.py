"""ckpt.integrations.torchtitan against torchtitan's own DCP checkpoint manager, in one process.

The trainer's state is built from torchtitan's real components on a small model (torchtitan's
models need triton; its checkpointing does not): an ``OptimizersContainer`` with two optimizers
(Adam for biases, AdamW for the rest), an ``LRSchedulersContainer`` with warmup, a
``ParallelAwareDataloader`` (torchdata's ``StatefulDataLoader``) over a deterministic stream,
and a ``train_state`` like the trainer's. Both managers are built the way the trainer builds
them, ``config.checkpoint.build(...)``, and driven the way it drives them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

pytest.importorskip("torchtitan")
pytest.importorskip("torchdata")

from torchtitan.components.checkpointer import BaseCheckpointManager, CheckpointManager
from torchtitan.config import Configurable
from torchtitan.config.override import OverrideConfig, apply_overrides

import ckpt
from ckpt.integrations.torchtitan import CkptCheckpointManager
from tests.unit.torchtitan_job import (
    TrainState,
    assert_same,
    build,
    ours,
    snapshot,
    theirs,
)

# -- tests ------------------------------------------------------------------------------------------


def test_bitexact_with_torchtitans_dcp_manager_on_save_and_load(tmp_path):
    """Both managers save the same live state at step 3; fresh jobs load it back, each with its
    own manager: every entry equals the saved state and the other manager's load bit for bit,
    what landed in ckpt's storage is the saved state (taken lazily: training went on while it
    was copied), and training continues identically."""
    job = build(seed=0)
    mine, dcp = job.build_manager(ours(tmp_path / "ckpt")), job.build_manager(theirs(tmp_path / "dcp"))
    for _ in range(3):
        job.train_step(mine)
    saved = snapshot(job)
    assert dcp.save(3) and mine.save(3)
    job.train_step(mine)  # step 4 runs while step 3 is staged and written
    after = snapshot(job)
    job.train_step(mine)
    mine.close()
    dcp.close()

    stored = ckpt.read(str(tmp_path / "ckpt"), step=3)
    assert_same(stored["model"], saved["model"], "stored model")
    assert_same(stored["optimizer"], saved["optimizer"], "stored optimizer")
    assert stored["train_state"] == {"step": 3, "ntokens_seen": 3 * 4 * 13}
    assert stored["lr_scheduler"] == saved["lr_scheduler"]

    loaded = {}
    for name, config in (("ours", ours(tmp_path / "ckpt")), ("dcp", theirs(tmp_path / "dcp"))):
        fresh = build(seed=5)  # other weights, no optimizer state yet
        manager = fresh.build_manager(config)
        assert manager.load()
        loaded[name] = snapshot(fresh)
        assert_same(loaded[name], saved, f"{name} loaded")
        fresh.train_step(manager)  # the same batch, learning rate and update as the saving job's step 4
        assert_same(snapshot(fresh), after, f"{name}: step 4 after the load")
        manager.close()
    assert_same(loaded["ours"], loaded["dcp"], "ours vs dcp")


def test_train_state_dataloader_and_lr_round_trip_over_restarts(tmp_path):
    """Interrupted after step 5 and resumed from step 4, a run ends bit-identical to one that
    never stopped: model, optimizer, learning rate, data position, train state; and each rank's
    random generators are back as they were at the checkpoint."""
    straight = build(seed=1)
    for _ in range(7):
        straight.train_step()
    want = snapshot(straight)

    first = build(seed=1)
    manager = first.build_manager(ours(tmp_path, interval=2))
    for _ in range(5):
        first.train_step(manager)
        if first.train_state.step == 4:
            rng_at_save = torch.get_rng_state()
        manager.save(first.train_state.step)
        torch.randn(3)  # random numbers drawn after the checkpoint (dropout, sampling)
    manager.close()  # the job dies after step 5; the newest checkpoint is step 4
    assert ckpt.committed_steps(ckpt.open_storage(str(tmp_path))) == [2, 4]

    torch.manual_seed(1234)  # a restarted process starts from another random state
    resumed = build(seed=1)
    manager = resumed.build_manager(ours(tmp_path, interval=2))
    assert manager.load()
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert resumed.train_state.step == 4 and resumed.lr_schedulers.schedulers[0].last_epoch == 4
    while resumed.train_state.step < 7:
        resumed.train_step(manager)
        manager.save(resumed.train_state.step)
    manager.close()
    assert_same(snapshot(resumed), want, "resumed")


def test_retention_follows_keep_latest_k_and_keep_every(tmp_path):
    job = build(seed=2)
    manager = job.build_manager(ours(f"memory://{tmp_path.name}-retention", keep_latest_k=2, keep_every=4))
    for step in range(1, 10):
        job.train_step(manager)
        manager.save(step)
    manager.close()
    assert ckpt.committed_steps(ckpt.open_storage(f"memory://{tmp_path.name}-retention")) == [4, 8, 9]


def test_fsspec_folder_model_only_last_step_and_exclusions(tmp_path):
    """An fsspec URL as folder; the last step saved model-only in the export dtype; a load of
    it takes the model alone; ``exclude_from_loading`` leaves an entry as it is; asking for an
    entry the checkpoint lacks names it."""
    url = f"memory://{tmp_path.name}-last"
    job = build(seed=3)
    manager = job.build_manager(ours(url, interval=10, last_save_model_only=True, export_dtype="bfloat16"))
    job.train_step(manager)
    assert manager.save(1) is False  # not a checkpoint step
    job.train_step(manager)
    saved = snapshot(job)
    assert manager.save(2, last_step=True)  # committed before save returns
    assert ckpt.committed_steps(ckpt.open_storage(url)) == [2]
    stored = ckpt.read(url, step=2)
    assert sorted(stored) == ["model"] and all(
        t.dtype == torch.bfloat16 for t in stored["model"].values() if t.is_floating_point()
    )
    manager.close()

    fresh = build(seed=4)
    before = snapshot(fresh)
    manager = fresh.build_manager(ours(url))
    assert manager.load()
    got = snapshot(fresh)
    for k, t in saved["model"].items():
        want = t.to(torch.bfloat16).to(t.dtype) if t.is_floating_point() else t
        assert_same(got["model"][k], want, f"model[{k!r}]")
    assert_same(got["train_state"], before["train_state"], "train_state untouched")
    manager.close()

    full = f"memory://{tmp_path.name}-full"
    manager = job.build_manager(ours(full))
    assert manager.save(2)
    manager.close()
    other = build(seed=4)
    untouched = snapshot(other)["dataloader"]
    manager = other.build_manager(ours(full, exclude_from_loading=["dataloader"]))
    assert manager.load(step=2)
    got = snapshot(other)
    assert_same(got["optimizer"], saved["optimizer"], "optimizer")
    assert_same(got["dataloader"], untouched, "dataloader excluded")
    manager.close()

    states_with_extra = build(seed=4)
    manager = states_with_extra.build_manager(ours(full))
    manager.states["ema"] = TrainState()  # an entry the checkpoint does not hold
    with pytest.raises(ckpt.StateMismatchError, match="ema.*exclude_from_loading"):
        manager.load(step=2)
    manager.close()


def test_initial_load_from_a_dcp_checkpoint_of_torchtitans_manager(tmp_path):
    """A job moving from the DCP manager starts from its last ``step-N`` folder."""
    job = build(seed=6)
    dcp = job.build_manager(theirs(tmp_path / "dcp"))
    job.train_step()
    dcp.save(1)
    dcp.close()
    saved = snapshot(job)
    fresh = build(seed=7)
    manager = fresh.build_manager(
        ours(tmp_path / "ckpt", initial_load_path=str(tmp_path / "dcp" / "step-1"), initial_load_model_only=False)
    )
    assert manager.load()
    assert_same(snapshot(fresh), saved, "initial load")
    manager.close()
    nothing = build(seed=7).build_manager(ours(tmp_path / "empty"))
    assert nothing.load() is False  # no checkpoint, no initial path: a fresh start
    nothing.close()


class PrefixAdapter:
    """A model's state-dict adapter, small: the Hugging Face names are torchtitan's under
    ``model.``, in one safetensors file. Floating-point tensors only, as torchtitan's models
    (torch's safetensors consolidation takes no integer tensors, such as BatchNorm's count)."""

    fqn_to_index_mapping = None
    hf_assets_path = None

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {f"model.{k}": v for k, v in state_dict.items() if v.is_floating_point()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k.removeprefix("model."): v for k, v in hf_state_dict.items()}

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> Any:
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        return HuggingFaceStorageReader(path)


def test_last_step_in_hugging_face_format_and_initial_load_from_it(tmp_path):
    """``last_save_in_hf`` writes the model in ``export_dtype`` under Hugging Face names beside
    the run's steps; ``initial_load_in_hf`` of a new run loads it."""
    safetensors = pytest.importorskip("safetensors.torch")
    job = build(seed=8)
    config = ours(tmp_path / "run", last_save_in_hf=True, last_save_model_only=True, export_dtype="bfloat16")
    manager = job.build_manager(config, sd_adapter=PrefixAdapter())
    job.train_step(manager)
    assert manager.save(1)
    job.train_step(manager)
    saved = snapshot(job)["model"]
    assert manager.save(2, last_step=True)
    manager.close()
    assert ckpt.committed_steps(ckpt.open_storage(str(tmp_path / "run"))) == [1]  # the export is no step
    files = sorted((tmp_path / "run" / "hf" / "step-2").glob("model*.safetensors"))  # as torch's HF writer names them
    assert files and (tmp_path / "run" / "hf" / "step-2" / "model.safetensors.index.json").is_file()
    exported = {k: v for f in files for k, v in safetensors.load_file(str(f)).items()}
    want = {f"model.{k}": v.to(torch.bfloat16) for k, v in saved.items() if v.is_floating_point()}
    assert_same(exported, want, "exported")

    fresh = build(seed=9)
    manager = fresh.build_manager(
        ours(tmp_path / "next", initial_load_in_hf=True, initial_load_path=str(tmp_path / "run" / "hf" / "step-2")),
        sd_adapter=PrefixAdapter(),
    )
    before = snapshot(fresh)["model"]
    assert manager.load()
    rounded = {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else before[k] for k, v in saved.items()}
    assert_same(snapshot(fresh)["model"], rounded, "loaded from Hugging Face safetensors")
    manager.close()


# -- selecting the manager from torchtitan's config --------------------------------------------------


class Root(Configurable):
    """A stand-in for torchtitan's ``Trainer.Config``: the same ``checkpoint`` field."""

    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        checkpoint: BaseCheckpointManager.Config = field(default_factory=CheckpointManager.Config)
        override: OverrideConfig = field(default_factory=OverrideConfig)


def test_selected_by_torchtitans_override_mechanism(tmp_path):
    root = Root.Config(
        checkpoint=CheckpointManager.Config(enable=True, folder="ckpt", interval=7, keep_latest_k=4, async_mode="async")
    )
    imports = [("ckpt.integrations.torchtitan.use_ckpt", {"agent": None, "keep_every": 70})]
    apply_overrides(OverrideConfig(imports=imports), root)
    cfg = root.checkpoint
    assert type(cfg) is CkptCheckpointManager.Config
    assert (cfg.enable, cfg.folder, cfg.interval, cfg.keep_latest_k, cfg.keep_every) == (True, "ckpt", 7, 4, 70)
    manager = build(seed=0).build_manager(cfg, base_folder=str(tmp_path))
    assert isinstance(manager, CkptCheckpointManager)
    assert manager.checkpointer.storage.url.endswith("/ckpt")
    manager.close()


def test_command_line_sets_our_fields():
    tyro = pytest.importorskip("tyro")
    from torchtitan.config.manager import custom_registry

    default = Root.Config(checkpoint=CkptCheckpointManager.Config(folder="s3://bucket/run"))
    cfg = tyro.cli(
        Root.Config,
        args=["--checkpoint.keep-every", "100", "--checkpoint.agent", "unix:///a.sock", "--checkpoint.interval", "50"],
        default=default,
        registry=custom_registry,
    )
    assert type(cfg.checkpoint) is CkptCheckpointManager.Config
    assert (cfg.checkpoint.keep_every, cfg.checkpoint.agent, cfg.checkpoint.interval) == (100, "unix:///a.sock", 50)


@pytest.mark.parametrize(
    "field_name,value",
    [
        ("agent", "/no/scheme.sock"),
        ("keep_every", -1),
        ("host_budget_bytes", 0),
        ("when_busy", "drop"),
        ("on_error", "ignore"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        CkptCheckpointManager.Config(**{field_name: value})


def test_disabled_manager_does_nothing(tmp_path):
    manager = build(seed=0).build_manager(CkptCheckpointManager.Config(enable=False, folder=str(tmp_path)))
    assert manager.load() is False and manager.save(100) is False
    manager.maybe_wait_for_staging()
    manager.close()
    assert list(tmp_path.iterdir()) == []


def test_import_is_lazy_and_names_the_extra():
    code = textwrap.dedent("""
        import sys
        import ckpt, ckpt.integrations
        assert not [m for m in sys.modules if m.startswith("torchtitan")], "ckpt imported torchtitan"
        sys.modules["torchtitan"] = None  # as if it were not installed
        try:
            import ckpt.integrations.torchtitan
        except ImportError as e:
            assert "pip install 'ckpt[torchtitan]'" in str(e), e
        else:
            raise AssertionError("no ImportError without torchtitan")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
