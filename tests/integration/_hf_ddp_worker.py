"""One process of tests/integration/test_integration_hf.py, started by torchrun:
``python -m torch.distributed.run --standalone --nproc_per_node 2 _hf_ddp_worker.py PHASE URL OUT RESULT``.

PHASE: ``reference`` (no callback, 7 steps), ``first`` (CkptCallback, stops after step 4),
``resume`` (CkptCallback, resumes from the newest checkpoint). Each rank writes its weights,
optimizer state and losses to ``RESULT.<rank>`` (torch.save of tensors and plain values).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch
from transformers import Trainer, TrainerCallback

from ckpt.integrations.hf import CkptCallback
from tests.unit.test_integration_hf import _args, _Data, _model


class _Stop(Exception):
    pass


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise _Stop


def main(phase: str, url: str, out: str, result: str) -> None:
    torch.set_num_threads(1)
    args = _args(Path(out), save_steps=3, ddp_backend="gloo", max_steps=7, per_device_train_batch_size=1)
    callbacks: list = [] if phase == "reference" else [CkptCallback(url)]
    if phase == "first":
        callbacks.insert(0, _Crash())
    trainer = Trainer(_model(), args, train_dataset=_Data(), callbacks=callbacks)
    assert trainer.args.world_size == int(os.environ["WORLD_SIZE"])
    resume = callbacks[0].latest_checkpoint(out) if phase == "resume" else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except _Stop:
        callbacks[-1].close()
        return
    opt = trainer.optimizer.optimizer
    torch.save(
        {
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optim": opt.state_dict()["state"],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "resumed_from": resume,
        },
        f"{result}.{trainer.args.process_index}",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
