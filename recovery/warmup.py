"""A worker process's warm-up (:func:`warm_up`): what ``run`` and a training loop's first
steps initialise lazily, done once per process before its first attempt. No Ray needed."""

from __future__ import annotations

import gc
import logging
import os

import torch

log = logging.getLogger(__name__)


def warm_up() -> None:
    """What ``run`` and a training loop's first steps initialise lazily, once per process, done
    ahead: the node agent's sink (which the Checkpointer opens); an optimizer's first
    construction imports torch._dynamo (1.5-2 s of a replacement's start on a loaded node); its
    first step and autograd's first backward set up their kernels, except in a process that
    may be handed GPUs later (:func:`_gpus_may_come_later`). No random numbers are drawn: the
    process's generator stays as a new process has it.

    Then what the process holds (some 300,000 objects of torch, torch._dynamo and Ray, held
    for its life) is moved out of the cycle collector's sight (``gc.freeze``): a full
    collection walks it in 130-180 ms, and one came in the middle of a recovery, at every
    restart in place (``_leave_group``) and after a replacement's restore (whose objects make
    one due), on the cores the other ranks restore on."""
    try:
        _exercise()
    except Exception:
        log.debug("warming the worker up failed", exc_info=True)
    gc.collect(1)  # the young garbage of the imports and the exercise; the rest is kept for good
    gc.freeze()


def _gpus_may_come_later() -> bool:
    """Whether this process holds no GPU now but may be handed one (a warm standby: Ray gives it
    none, ``_take_devices`` gives it the lost rank's). CUDA fixes its count of devices the
    first time autograd runs a backward or AdamW steps, even on CPU tensors (measured on an
    H200, torch 2.11): one done before the handover leaves the process seeing no GPU, or the
    wrong ones, for good."""
    if torch.version.cuda is None:
        return False
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and ray.is_initialized():  # (asked elsewhere, Ray would start a cluster)
        return not ray.get_gpu_ids()
    return os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # not in a Ray worker: what CUDA would see


def _exercise() -> None:
    import torch.distributed

    import agent.trainer.sink  # noqa: F401

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    opts = (torch.optim.AdamW([weight]), torch.optim.SGD([weight], lr=0.1))  # (imports torch._dynamo)
    if _gpus_may_come_later():
        return  # the first backward and step fix CUDA's devices: the training loop does them
    for opt in opts:
        (torch.ones(2, 4) @ weight).sum().backward()
        opt.step()
        opt.zero_grad()
