"""ckpt.integrations.hf: a Trainer checkpointed by CkptCallback, stopped and resumed by a new
Trainer, ends bit-identical (weights, optimizer state, scheduler, losses) to one that never
stopped; likewise an accelerate loop through AcceleratorCheckpointer. Tiny random-init GPT-2
with dropout on a shuffled synthetic dataset, on CPU; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import Accelerator, DataLoaderConfiguration
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import ckpt
from ckpt.integrations.hf import AcceleratorCheckpointer, CkptCallback, Pointer, read_pointer, write_pointer
from tests.helpers import assert_same

REPO = Path(__file__).resolve().parents[2]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    )
    return GPT2LMHeadModel(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 10, seq: int = 8) -> None:
        self.ids = torch.randint(0, 32, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(out),
        "max_steps": 8,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 123,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)


class _Crash(TrainerCallback):
    """Stops the job like a killed process would: an exception out of train()."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"crash at step {self.at}")


def _outcome(trainer: Trainer) -> dict:
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optim": opt.state_dict(),
        "sched": trainer.lr_scheduler.state_dict(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step": trainer.state.global_step,
    }


_REFERENCE: dict[tuple, dict] = {}


def _reference(tmp_path_factory, gas: int, **kw) -> dict:
    """The uninterrupted run, without any callback."""
    key = (gas, *sorted(kw.items()))
    if key not in _REFERENCE:
        out = tmp_path_factory.mktemp("ref")
        args = _args(out, save_strategy="no", gradient_accumulation_steps=gas, **kw)
        trainer = Trainer(_model(), args, train_dataset=_Data(), eval_dataset=_Data(4))
        trainer.train()
        _REFERENCE[key] = _outcome(trainer)
    return _REFERENCE[key]


# 5 batches an epoch. With evaluation every 3 steps, the evaluation loader draws a seed from the
# generators after step 3, before the step-4 forward: the snapshot of step 3 must see that draw.
@pytest.mark.parametrize(
    "save_steps, crash_at, gas, extra",
    [(3, 4, 1, {}), (5, 6, 1, {}), (2, 3, 2, {}), (3, 4, 1, {"eval_strategy": "steps", "eval_steps": 3})],
    ids=["mid-epoch", "epoch-boundary", "grad-accumulation", "with-evaluation"],
)
def test_trainer_resumes_bit_exactly(tmp_path, tmp_path_factory, save_steps, crash_at, gas, extra):
    url, out = tmp_path / "run", tmp_path / "out"
    first = CkptCallback(str(url))
    trainer = Trainer(
        _model(),
        _args(out, save_steps=save_steps, gradient_accumulation_steps=gas, **extra),
        train_dataset=_Data(),
        eval_dataset=_Data(4),
        callbacks=[_Crash(crash_at), first],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    first.close()  # the process lives on in a test: let the checkpoints in flight land
    assert ckpt.committed_steps(ckpt.open_storage(str(url))) == [save_steps]

    second = CkptCallback(str(url))
    resume = second.latest_checkpoint(str(out))
    assert resume == str(out / f"checkpoint-{save_steps}")
    trainer = Trainer(
        _model(),
        _args(out, save_steps=save_steps, gradient_accumulation_steps=gas, **extra),
        train_dataset=_Data(),
        eval_dataset=_Data(4),
        callbacks=[second],
    )
    trainer.train(resume_from_checkpoint=resume)

    ref = _reference(tmp_path_factory, gas, **extra)
    got = _outcome(trainer)
    assert got["step"] == ref["step"] == 8
    assert_same(got["model"], ref["model"], "model")
    assert_same(got["optim"], ref["optim"], "optim")
    assert_same(got["sched"], ref["sched"], "sched")
    # the resumed Trainer's log history: the first run's losses up to the checkpoint, then its own
    assert got["losses"] == ref["losses"]


def test_save_strategy_epoch(tmp_path):
    url = tmp_path / "run"
    args = _args(tmp_path / "out", save_strategy="epoch")
    Trainer(_model(), args, train_dataset=_Data(), callbacks=[CkptCallback(str(url))]).train()
    # 5 steps an epoch: the end of epoch 0, and the end of training (max_steps 8, inside epoch 1)
    assert ckpt.committed_steps(ckpt.open_storage(str(url))) == [5, 8]
    assert ckpt.read(str(url), step=5, include="trainer")["trainer"]["rng_at"] == "epoch_begin"


def test_checkpoints_follow_save_strategy_and_total_limit(tmp_path, tmp_path_factory):
    url, out = tmp_path / "run", tmp_path / "out"
    # a pointer folder into another run: retention of this one leaves it alone
    write_pointer(out, Pointer("file:///elsewhere", 7), "{}", [])
    callback = CkptCallback(str(url))
    trainer = Trainer(
        _model(), _args(out, save_steps=2, save_total_limit=2), train_dataset=_Data(), callbacks=[callback]
    )
    trainer.train()
    # steps 2, 4, 6, 8 taken; save_total_limit=2 -> keep_last=2
    assert ckpt.committed_steps(ckpt.open_storage(str(url))) == [6, 8]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    folder = out / "checkpoint-8"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ckpt-pointer.safetensors",
        "ckpt.json",
        "model.safetensors.index.json",
        "trainer_state.json",
    ]
    assert read_pointer(folder) == Pointer(ckpt.open_storage(str(url)).url, 8)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 9))
    # The checkpoint taken is the state of the run: weights bit-exact with the reference, which
    # the callback did not change by watching.
    saved = ckpt.read(str(url), step=8, include="model/*")["model"]
    ref = _reference(tmp_path_factory, 1)["model"]
    for name, tensor in saved.items():
        assert torch.equal(tensor, ref[name]), name
    assert_same(_outcome(trainer)["model"], ref, "model")


def test_latest_checkpoint_rebuilds_a_lost_folder_and_fresh_start_is_refused(tmp_path):
    url, out = tmp_path / "run", tmp_path / "out"
    first = CkptCallback(str(url))
    Trainer(_model(), _args(out, max_steps=3), train_dataset=_Data(), callbacks=[first]).train()
    written = (out / "checkpoint-3" / "trainer_state.json").read_text()
    other = tmp_path / "other-machine"
    again = CkptCallback(str(url))
    assert again.latest_checkpoint(str(other)) == str(other / "checkpoint-3")
    assert (other / "checkpoint-3" / "trainer_state.json").read_text() == written
    assert CkptCallback(str(tmp_path / "empty")).latest_checkpoint(str(other)) is None
    # A Trainer that starts from step 0 on a run with checkpoints would write over them: refused.
    trainer = Trainer(_model(), _args(out, max_steps=3), train_dataset=_Data(), callbacks=[CkptCallback(str(url))])
    with pytest.raises(ckpt.CheckpointExistsError, match="resume_from_checkpoint"):
        trainer.train()
    assert (out / "checkpoint-3" / "trainer_state.json").read_text() == written  # nothing lost


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"save_strategy": "best", "eval_strategy": "steps", "eval_steps": 2, "metric_for_best_model": "loss"},
            "save_strategy='best'",
        ),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 3}, "load_best_model_at_end"),
    ],
)
def test_unsupported_trainer_settings_are_refused_at_construction(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Trainer(
            _model(),
            _args(tmp_path / "out", **kw),
            train_dataset=_Data(),
            eval_dataset=_Data(4),
            callbacks=[CkptCallback(str(tmp_path / "run"))],
        )


def test_bad_options_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        CkptCallback(str(tmp_path), every_n_steps=5)
    with pytest.raises(ValueError, match="keep_last"):
        CkptCallback(str(tmp_path), keep_last=0)


# -- accelerate -------------------------------------------------------------------------------


def _accelerate_run(url: Path, *, steps: int, every: int = 3, crash_at: int | None = None) -> dict:
    torch.manual_seed(7)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = _model()
    torch.manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    loader = torch.utils.data.DataLoader(_Data(), batch_size=2, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    ckptr = AcceleratorCheckpointer(acc, str(url), every_n_steps=every, keep_last=None)
    start = ckptr.load_state() or 0
    step, losses = start, []
    try:
        for epoch in range(start // len(loader), 100):
            for batch in ckptr.batches(loader, epoch, skip=start - epoch * len(loader)):
                model.train()
                loss = model(**batch).loss
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(loss.item())
                ckptr.save_state(step)  # step: the index of the step just taken
                step += 1
                if step == crash_at:
                    raise KeyboardInterrupt
                if step == steps:
                    return {
                        "model": {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()},
                        "optim": opt.optimizer.state_dict(),
                        "sched": sched.scheduler.state_dict(),
                        "losses": losses,
                        "start": start,
                    }
    finally:
        ckptr.close()
    raise AssertionError("unreachable")


# 5 batches an epoch: resume inside epoch 0, at the start of epoch 1, inside epoch 1
@pytest.mark.parametrize(
    "every, crash_at, start", [(3, 5, 4), (4, 6, 5), (3, 8, 7)], ids=["mid-epoch", "epoch-boundary", "second-epoch"]
)
def test_accelerate_resumes_bit_exactly(tmp_path, every, crash_at, start):
    ref = _accelerate_run(tmp_path / "ref", steps=9)
    with pytest.raises(KeyboardInterrupt):
        _accelerate_run(tmp_path / "run", steps=9, every=every, crash_at=crash_at)
    got = _accelerate_run(tmp_path / "run", steps=9, every=every)
    assert got["start"] == start
    assert_same(got["model"], ref["model"], "model")
    assert_same(got["optim"], ref["optim"], "optim")
    assert_same(got["sched"], ref["sched"], "sched")
    assert got["losses"] == ref["losses"][got["start"] :]


# -- import rules -----------------------------------------------------------------------------


def test_import_without_the_framework_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "ckpt.integrations.hf" or m.startswith("ckpt.integrations.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'ckpt\[hf\]'"):
        __import__("ckpt.integrations.hf")


def test_importing_ckpt_imports_no_framework():
    code = (
        "import sys, ckpt, ckpt.integrations; "
        "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]; assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)
