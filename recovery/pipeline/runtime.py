"""The driver of a pipeline job: :class:`RayPipeline` runs every stage in its own Ray actor
process (:class:`recovery.pipeline.stage.StageWorker`); stages exchange activations and
gradients with ``torch.distributed`` send/recv over gloo (GPipe schedule). A stage is lost by
killing its process; the driver rebuilds it with a stage policy (``neighbor_average``,
``copy``, ``random``, ``reload``, ``auto``) and the process group is re-formed with the
survivors, who keep their live weights and optimizer state.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import ray
import torch.distributed as dist

from .. import checkfree as cf
from .. import events as ev
from ..checkfree import PipelineJob, StageRecoveryPolicy, stage_policy
from ..detect import WORKER_DIED, Failure
from ..errors import RecoveryError, TooManyFailuresError
from ..events import EventLog
from ..policy import ABORT
from .spec import PipelineConfig, PipelineModel, StageLostError
from .stage import StageWorker


class RayPipeline(PipelineJob):
    """Drive a pipeline of :class:`StageWorker` actors: train, lose stages, recover them.

    ``model`` is the model side of the job (:class:`PipelineModel`: the stages, how they
    train, the data), given by the caller. Needs ``ray.init()`` first. Recovery policies:
    ``neighbor_average`` (CheckFree; CheckFree+ copy for the first/last stage), ``copy`` (copy
    one neighbour), ``random`` (fresh init), ``reload`` (every stage back to the newest
    checkpoint) and ``auto`` (reload or neighbour average, by
    :func:`recovery.checkfree.decide_auto`). ``events`` records each recovery.
    """

    def __init__(self, cfg: PipelineConfig, model: PipelineModel, *, events: EventLog | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.num_stages = model.num_stages
        # Printed as it happens, like recovery.run's; pass EventLog(echo=None) for silence.
        self.event_log = events if events is not None else EventLog()
        self._actor_cls = ray.remote(num_cpus=cfg.actor_num_cpus, max_restarts=0)(StageWorker)
        self.host = "127.0.0.1" if _single_node() else ray.util.get_node_ip_address()
        self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False)
        self.generation = 0
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: int | None = None
        self.tracker = cf.LossBumpTracker()
        self._step_seconds: list[float] = []
        self.workers = [self._new_worker(i) for i in range(self.num_stages)]
        self._join_all()

    # -- plumbing ---------------------------------------------------------------------------
    def _new_worker(self, index: int, **kw: Any) -> Any:
        return self._actor_cls.remote(self.cfg, self.model, index, step=kw.pop("step", self.step), **kw)

    def _join_all(self) -> None:
        self.generation += 1
        port = self._store.port
        # New actors first start (a process that imports torch) so that none waits out the
        # rendezvous timeout on a slow peer.
        ray.get([w.pid.remote() for w in self.workers], timeout=self.cfg.step_timeout_s)
        ray.get([w.join.remote(self.host, port, self.generation) for w in self.workers],
                timeout=self.cfg.step_timeout_s)

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def snapshot(self, index: int) -> dict[str, Any]:
        return ray.get(self.workers[index].snapshot.remote())

    def kill_stage(self, index: int) -> int:
        """Lose a stage the hard way: SIGKILL its process (between steps). Returns the pid killed."""
        pid = ray.get(self.workers[index].pid.remote())
        os.kill(pid, signal.SIGKILL)
        return pid

    def _checkpoint_url(self, index: int) -> str:
        return f"{self.cfg.checkpoint_url.rstrip('/')}/stage{index}"

    # -- training ---------------------------------------------------------------------------
    def train(self, steps: int) -> list[dict[str, float]]:
        """Run ``steps`` steps; raises :class:`StageLostError` when a stage dies."""
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            futures = [w.train_step.remote(self.step) for w in self.workers]
            results, lost = [], []
            for i, f in enumerate(futures):
                try:
                    results.append(ray.get(f, timeout=self.cfg.step_timeout_s))
                except ray.exceptions.RayActorError:
                    lost.append(i)
                except ray.exceptions.RayTaskError:
                    pass  # a survivor whose peer died mid-step: it drops the step on recovery
            if lost or len(results) < len(self.workers):
                if not lost:
                    lost = self._dead_stages()
                raise StageLostError(lost, self.step)
            self.step += 1
            self._step_seconds.append(time.perf_counter() - t0)
            rec = {"step": self.step - 1, "loss": results[-1]["loss"], "grad_norms": [r["grad_norm"] for r in results]}
            self.history.append(rec)
            self.tracker.observe(rec["loss"])
            out.append(rec)
            self._after_step()
        return out

    def _dead_stages(self) -> list[int]:
        dead = []
        for i, w in enumerate(self.workers):
            try:
                ray.get(w.pid.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - any failure to answer means lost
                dead.append(i)
        return dead

    def _after_step(self) -> None:
        n = self.num_stages
        if self.cfg.replicate_every and self.step % self.cfg.replicate_every == 0 and n >= 2:
            pairs = [(0, 1), (n - 1, n - 2)] if n > 2 else [(0, 1), (1, 0)]
            ray.get([self.workers[dst].hold_replica.remote(self.workers[src].edge_layers.remote())
                     for src, dst in pairs])
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            ray.get([w.save.remote(self._checkpoint_url(i)) for i, w in enumerate(self.workers)])
            self.last_checkpoint = self.step

    # -- the run loop and the PipelineJob a stage policy drives ------------------------------
    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.event_log.emit(kind, message, **fields)

    def run(self, steps: int, policy: str | StageRecoveryPolicy = "neighbor_average", *, max_failures: int = 3,
            before_step: Any = None) -> list[dict[str, float]]:
        """Train until ``self.step == steps``, recovering every lost stage with ``policy`` (a
        name or a :class:`recovery.checkfree.StageRecoveryPolicy`), at most ``max_failures``
        times. ``before_step(pipeline, step)`` runs before each step (fault injection)."""
        the_policy = stage_policy(policy)
        self.log(ev.STARTED, f"pipeline of {len(self.workers)} stages, policy {the_policy.name}, "
                 f"from step {self.step} to {steps}", stages=len(self.workers), policy=the_policy.name)
        out: list[dict[str, float]] = []
        failures = 0
        while self.step < steps:
            if before_step is not None:
                before_step(self, self.step)
            try:
                out += self.train(1)
            except StageLostError as e:
                failures += 1
                failure = Failure(WORKER_DIED, failures, f"stage(s) {e.stages} lost at step {e.step}", time.time(),
                                  ranks=tuple(e.stages), last_step=e.step)
                self.log(ev.FAILURE, f"{failure.kind}: {failure.detail}", failure=failure.kind, stages=list(e.stages),
                         step=e.step)
                if failures > max_failures:
                    self.log(ev.ABORTED, f"giving up after {failures} failures (max_failures={max_failures})")
                    raise TooManyFailuresError(f"{failures} failures, max_failures={max_failures}") from e
                outcome = the_policy.on_failure(failure, self)
                if outcome.action == ABORT:
                    self.log(ev.ABORTED, outcome.detail)
                    raise RecoveryError(outcome.detail) from e
        self.log(ev.FINISHED, f"step {self.step} reached after {failures} failure(s)", failures=failures)
        return out

    def recover_stages(self, lost: list[int], policy: StageRecoveryPolicy) -> dict[str, Any]:
        """:class:`PipelineJob`'s verb, which :meth:`StageRecoveryPolicy.on_failure` calls."""
        return self.recover(lost, policy)

    def recover(self, lost: list[int], policy: str | StageRecoveryPolicy = "neighbor_average") -> dict[str, Any]:
        """Replace the lost stages' actors and re-form the process group; returns the event recorded.
        ``policy``: one of :data:`recovery.checkfree.STRATEGIES` or a :class:`StageRecoveryPolicy`."""
        if not isinstance(policy, StageRecoveryPolicy) and policy not in cf.STRATEGIES:
            raise ValueError(f"policy must be one of {cf.STRATEGIES}, got {policy!r}")
        the_policy = stage_policy(policy)
        strategy = the_policy.strategy
        n = self.num_stages
        t0 = time.perf_counter()
        survivors = [i for i in range(n) if i not in lost]
        steps = set(ray.get([self.workers[i].leave.remote() for i in survivors]))
        if len(steps) > 1:
            raise RuntimeError(f"survivors disagree on the step ({sorted(steps)}); reload instead")
        self.step = steps.pop() if steps else self.step
        plans = cf.plan_recovery({i: 1 for i in lost}, num_stages=n)
        event: dict[str, Any] = {"step": self.step, "lost": list(lost), "policy": strategy,
                                 "plans": [p.to_dict() for p in plans]}
        mean_step = sum(self._step_seconds[-20:]) / max(1, len(self._step_seconds[-20:])) or 1e-3
        inputs = cf.AutoInputs(
            step_seconds=mean_step,
            steps_since_snapshot=None if self.last_checkpoint is None else self.step - self.last_checkpoint,
            recovery_steps=self.tracker.recovery_steps)
        chosen, event["reason"] = the_policy.choose(plans, inputs)
        if chosen == "reload" and self.last_checkpoint is None:
            forced = [p.reason for p in plans if p.action is cf.RecoveryAction.RELOAD]
            raise RuntimeError(f"cannot rebuild {lost}: {forced or 'reload asked for'}, and there is no checkpoint "
                               "to reload (set checkpoint_every)")
        event["chosen"] = chosen
        self.log(ev.RESTORE_PLAN, f"stage(s) {list(lost)} at step {self.step}: {event['reason']}", **event)
        loss_before = self.history[-1]["loss"] if self.history else None
        if chosen == "reload":
            for s in lost:
                self.workers[s] = self._new_worker(s, step=self.last_checkpoint)
            self._join_all()
            ray.get([w.load.remote(self._checkpoint_url(i), self.last_checkpoint) for i, w in enumerate(self.workers)])
            event["rolled_back_steps"] = self.step - self.last_checkpoint
            self.step = self.last_checkpoint
        else:
            rule = cf.NeighborAverage(cf.NeighborAverageConfig(norm=self.cfg.norm, lr_scale=self.cfg.lr_scale))
            grad_norms = self.history[-1]["grad_norms"] if self.history else [0.0] * n
            for p in plans:
                self.workers[p.stage] = self._rebuild(p, chosen, rule, grad_norms, event)
            if loss_before is not None:
                self.tracker.start(loss_before)
            self._join_all()
        event["seconds"] = time.perf_counter() - t0
        self.events.append(event)
        how = ", ".join(f"stage {k}: {v}" for k, v in event.get("how", {}).items())
        if chosen == "reload":
            self.log(ev.RESTORED, f"every stage reloaded step {self.step} ({event['rolled_back_steps']} step(s) rolled "
                     f"back) in {event['seconds']:.2f} s", **event)
        else:
            self.log(ev.RESTORED, f"{how}; survivors kept their weights, nothing rolled back; "
                     f"{event['seconds']:.2f} s", **event)
        return event

    def _rebuild(self, plan: cf.StageRecovery, chosen: str, rule: cf.NeighborAverage, grad_norms: list[float],
                 event: dict[str, Any]) -> Any:
        """A new actor for the lost stage of ``plan``. Each stage here is its only replica, so a
        plan never copies a surviving data-parallel replica."""
        s = plan.stage
        keys = list(self.model.build_stage(s, seed=self.cfg.seed).state_dict())
        if chosen == "random":
            event.setdefault("how", {})[s] = "random"
            return self._new_worker(s, seed=self.cfg.seed + 7919 * (self.step + 1), rebuilt=True)
        if plan.action is cf.RecoveryAction.COPY_NEIGHBOR or chosen == "copy":
            partner = plan.sources[0] if plan.action is cf.RecoveryAction.COPY_NEIGHBOR else s - 1
            neighbor = ray.get(self.workers[partner].model_state.remote())
            replica = ray.get(self.workers[partner].held_replica.remote()) \
                if plan.action is cf.RecoveryAction.COPY_NEIGHBOR else None
            if plan.action is cf.RecoveryAction.COPY_NEIGHBOR and replica is None:
                raise RuntimeError(f"stage {partner} holds no replica of stage {s}'s edge layers (replicate_every=0?)")
            state = cf.copy_from_neighbor(neighbor, edge_replica=replica, keys=keys)
            event.setdefault("how", {})[s] = f"copy stage {partner}" + (" + edge replica" if replica else "")
        else:
            prev, nxt = ray.get([self.workers[s - 1].model_state.remote(), self.workers[s + 1].model_state.remote()])
            gp, gn = grad_norms[s - 1], grad_norms[s + 1]
            state = rule.rebuild(prev, nxt, prev_grad_norm=gp, next_grad_norm=gn, keys=keys)
            event.setdefault("how", {})[s] = "average"
            event.setdefault("weights", {})[s] = rule.weights(gp, gn)
        return self._new_worker(s, state=state, rebuilt=True)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []


def _single_node() -> bool:
    try:
        return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:  # noqa: BLE001
        return True
