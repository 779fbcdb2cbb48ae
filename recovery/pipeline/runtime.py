"""The driver of a pipeline job: :class:`RayPipeline` runs every stage in its own Ray actor
process (:class:`recovery.pipeline.stage.StageWorker`), ``replicas`` data-parallel copies of
each; stages exchange activations and gradients with ``torch.distributed`` send/recv over gloo
(GPipe schedule, in fixed order or CheckFree+'s swapped order), replicas average their
gradients. A process is lost by killing it; the driver replaces it (a surviving replica's state,
or a stage policy: ``neighbor_average``, ``copy``, ``random``, ``reload``, ``auto``) and the
process group is re-formed with the survivors, who keep their live weights and optimizer state.
State moves between stage processes by object reference (``ray.put`` by the holder, ``ray.get``
by the receiver), never through the driver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from typing import Any

import ray
import torch
import torch.distributed as dist

from .. import checkfree as cf
from .. import events as ev
from ..checkfree import PipelineJob, StageRecoveryPolicy, stage_policy
from ..detect import WORKER_DIED, Failure
from ..errors import RecoveryError, TooManyFailuresError
from ..events import EventLog
from ..policy import ABORT
from .schedule import check_swap, rank_of, stage_of
from .spec import PipelineConfig, PipelineModel, StageInit, StageLostError, SwappablePipelineModel
from .stage import StageWorker


class RayPipeline(PipelineJob):
    """Drive a pipeline of :class:`StageWorker` actors: train, lose stages, recover them.

    ``model`` is the model side of the job (:class:`PipelineModel`: the stages, how they
    train, the data), given by the caller. Needs ``ray.init()`` first. ``cfg.replicas``
    processes per stage (data parallel), ``cfg.swap`` for CheckFree+'s swapped micro-batch
    order (the model must then be a :class:`SwappablePipelineModel`). A lost process whose
    stage has a surviving replica is copied from it, bit for bit; a stage lost whole is
    recovered by the policy: ``neighbor_average`` (CheckFree; CheckFree+ copy for the
    first/last stage), ``copy`` (copy one neighbour), ``random`` (fresh init), ``reload`` (every
    stage back to the newest checkpoint) and ``auto`` (reload or neighbour average, by
    :func:`recovery.checkfree.decide_auto`). ``events`` records each recovery.
    """

    def __init__(self, cfg: PipelineConfig, model: PipelineModel, *, events: EventLog | None = None) -> None:
        if cfg.swap:
            check_swap(model.num_stages, model.micro_batches)
            if not isinstance(model, SwappablePipelineModel):
                raise TypeError(f"swap=True runs stages in parts: {type(model).__name__} must also implement "
                                "SwappablePipelineModel (embed, blocks, head)")
        self.cfg = cfg
        self.model = model
        self.num_stages = model.num_stages
        self.replicas = cfg.replicas
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
        self.tracker = cf.LossBumpTracker(prior_steps=cfg.auto_prior_steps, window=5,
                                          prior_steps_per_bump=cfg.auto_prior_steps_per_bump)
        self._step_seconds: list[float] = []
        self._recover_seconds: dict[str, float] = {}
        self._spares: list[Any] = []
        self._roles: list[Any] = []  # spares' become() calls not yet checked
        self.workers = [self._new_worker(i) for i in range(self.num_stages * self.replicas)]
        self._spares = [self._actor_cls.remote(cfg, model, None) for _ in range(cfg.spares)]
        self._join_all()

    # -- plumbing ---------------------------------------------------------------------------
    def _new_worker(self, rank: int, **kw: Any) -> Any:
        step = kw.pop("step", self.step)
        if self._spares:  # a process started ahead takes the role; another spare starts in the background
            worker = self._spares.pop(0)
            self._roles.append(worker.become.remote(rank, step=step, **kw))
            self._spares.append(self._actor_cls.remote(self.cfg, self.model, None))
            return worker
        return self._actor_cls.remote(self.cfg, self.model, rank, step=step, **kw)

    def _join_all(self) -> None:
        self.generation += 1
        port = self._store.port
        roles, self._roles = self._roles, []
        ray.get(roles, timeout=self.cfg.step_timeout_s)
        # New actors first start (a process that imports torch) so that none waits out the
        # rendezvous timeout on a slow peer.
        ray.get([w.pid.remote() for w in self.workers], timeout=self.cfg.step_timeout_s)
        ray.get([w.join.remote(self.host, port, self.generation) for w in self.workers],
                timeout=self.cfg.step_timeout_s)

    def rank(self, stage: int, replica: int = 0) -> int:
        """The process rank of ``stage``'s data-parallel ``replica`` (the index into ``workers``)."""
        return rank_of(stage, replica, self.num_stages)

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def spare_pids(self) -> list[int]:
        """The processes started ahead that the next failures will take, in the order they will."""
        return ray.get([w.pid.remote() for w in self._spares])

    def snapshot(self, rank: int) -> dict[str, Any]:
        return ray.get(self.workers[rank].snapshot.remote())

    def kill_stage(self, rank: int) -> int:
        """Lose a stage process the hard way: SIGKILL it (between steps). ``rank`` is the
        stage's index with one replica per stage (see :meth:`rank`). Returns the pid killed."""
        pid = ray.get(self.workers[rank].pid.remote())
        os.kill(pid, signal.SIGKILL)
        return pid

    def _checkpoint_url(self, stage: int) -> str:
        return f"{self.cfg.checkpoint_url.rstrip('/')}/stage{stage}"

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The mean loss of ``(inputs, targets)`` batches through the pipeline in fixed order (replica
        0's processes), with no update: what the model is worth now, e.g. before and after a rebuild."""
        out = ray.get([w.evaluate.remote(batches) for w in self.workers[:self.num_stages]],
                      timeout=self.cfg.step_timeout_s)
        return out[-1]

    # -- training ---------------------------------------------------------------------------
    def train(self, steps: int) -> list[dict[str, float]]:
        """Run ``steps`` steps; raises :class:`StageLostError` when a stage process dies."""
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            futures = [w.train_step.remote(self.step) for w in self.workers]
            results, lost, errors = [], [], []
            for i, f in enumerate(futures):
                try:
                    results.append(ray.get(f, timeout=self.cfg.step_timeout_s))
                except ray.exceptions.RayActorError:
                    lost.append(i)
                except ray.exceptions.RayTaskError as e:
                    errors.append(e)  # a survivor whose peer died mid-step: it drops the step on recovery
            if lost or len(results) < len(self.workers):
                if not lost:
                    lost = self._dead_ranks()
                if not lost:  # nobody died: the step itself failed (a bug, a timeout); say what
                    raise errors[0]
                raise StageLostError(sorted({stage_of(r, self.num_stages)[0] for r in lost}), self.step, ranks=lost)
            self.step += 1
            self._step_seconds.append(time.perf_counter() - t0)
            rec = {"step": self.step - 1, "loss": results[-1]["loss"],
                   "grad_norms": [r["grad_norm"] for r in results[:self.num_stages]]}
            self.history.append(rec)
            self.tracker.observe(rec["loss"])
            out.append(rec)
            self._after_step()
        return out

    def _dead_ranks(self) -> list[int]:
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
            # CheckFree+: each edge stage's own layers kept on its swap partner, replica by replica;
            # the holder puts them in the object store, the partner fetches them.
            edges = [(0, 1), (n - 1, n - 2)] if n > 2 else [(0, 1), (1, 0)]
            pairs = [(self.rank(src, r), self.rank(dst, r)) for r in range(self.replicas) for src, dst in edges]
            refs = ray.get([self.workers[src].share_edge_layers.remote() for src, _ in pairs])
            ray.get([self.workers[dst].hold_replica.remote([ref]) for (_, dst), ref in zip(pairs, refs)])
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            ray.get([w.save.remote(self._checkpoint_url(stage_of(i, n)[0])) for i, w in enumerate(self.workers)])
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
        self.log(ev.STARTED, f"pipeline of {self.num_stages} stages x {self.replicas} replica(s), policy "
                 f"{the_policy.name}{', swapped order' if self.cfg.swap else ''}, from step {self.step} to {steps}",
                 stages=self.num_stages, replicas=self.replicas, policy=the_policy.name, swap=self.cfg.swap)
        out: list[dict[str, float]] = []
        failures = 0
        while self.step < steps:
            if before_step is not None:
                before_step(self, self.step)
            try:
                out += self.train(1)
            except StageLostError as e:
                failures += 1
                failure = Failure(WORKER_DIED, failures, f"stage(s) {e.stages} lost at step {e.step} "
                                  f"(rank(s) {e.ranks})", time.time(), ranks=tuple(e.ranks), last_step=e.step)
                self.log(ev.FAILURE, f"{failure.kind}: {failure.detail}", failure=failure.kind, stages=list(e.stages),
                         ranks=list(e.ranks), step=e.step)
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
        """Replace the lost processes (ranks; a stage's index with one replica per stage) and
        re-form the process group; returns the event recorded. ``policy``: one of
        :data:`recovery.checkfree.STRATEGIES` or a :class:`StageRecoveryPolicy`."""
        if not isinstance(policy, StageRecoveryPolicy) and policy not in cf.STRATEGIES:
            raise ValueError(f"policy must be one of {cf.STRATEGIES}, got {policy!r}")
        the_policy = stage_policy(policy)
        n, lost = self.num_stages, sorted(set(lost))
        t0 = time.perf_counter()
        survivors = [i for i in range(len(self.workers)) if i not in lost]
        steps = set(ray.get([self.workers[i].leave.remote() for i in survivors]))
        if len(steps) > 1:
            raise RuntimeError(f"survivors disagree on the step ({sorted(steps)}); reload instead")
        self.step = steps.pop() if steps else self.step
        by_stage = Counter(stage_of(r, n)[0] for r in lost)
        plans = cf.plan_recovery(dict(by_stage), num_stages=n, replicas_per_stage=self.replicas)
        event: dict[str, Any] = {"step": self.step, "lost": sorted(by_stage), "ranks": lost,
                                 "policy": the_policy.strategy, "plans": [p.to_dict() for p in plans]}
        # auto, where a stage is rebuilt and a snapshot could be reloaded instead: rebuild first, measure
        # the bump on the last step's batch (its loss recorded before the failure), then choose
        probing = (the_policy.strategy == "auto" and self.replicas == 1 and bool(self.history)
                   and self.history[-1]["step"] == self.step - 1 and cf.worth_probing(
                       plans, None if self.last_checkpoint is None else self.step - self.last_checkpoint))
        if probing:
            chosen, event["reason"] = "neighbor_average", ("auto: rebuilding first, then weighing the loss bump it "
                                                           "causes against a reload")
        else:
            chosen, event["reason"] = the_policy.choose(plans, self._auto_inputs())
        if chosen == "reload" and self.last_checkpoint is None:
            forced = [p.reason for p in plans if p.action is cf.RecoveryAction.RELOAD]
            raise RuntimeError(f"cannot rebuild {sorted(by_stage)}: {forced or 'reload asked for'}, and there is no "
                               "checkpoint to reload (set checkpoint_every)")
        event["chosen"] = chosen
        self.log(ev.RESTORE_PLAN, f"stage(s) {sorted(by_stage)} at step {self.step}: {event['reason']}", **event)
        loss_before = self.history[-1]["loss"] if self.history else None
        if chosen == "reload":
            for r in lost:
                self.workers[r] = self._new_worker(r, step=self.last_checkpoint)
            self._join_all()
            self._reload_all(event)
        else:
            inits = self._inits(plans, lost, chosen, event)
            event["spares_used"] = min(len(inits), len(self._spares))
            for r, init in inits.items():
                self.workers[r] = self._new_worker(r, init=init)
            self._join_all()
            event["fetch_seconds"] = max(ray.get([self.workers[r].init_time.remote() for r in inits]), default=0.0)
            bump = self._probe(plans, the_policy, event) if probing else None
            if event["chosen"] == "reload":
                self._reload_all(event)  # (every stage loads the snapshot: the rebuilt ones' state goes too)
                chosen = "reload"
            elif loss_before is not None and any(p.action is not cf.RecoveryAction.COPY_REPLICA for p in plans):
                self.tracker.start(loss_before, bump=bump)
        event["seconds"] = time.perf_counter() - t0
        self._recover_seconds["reload" if chosen == "reload" else "rebuild"] = event["seconds"]
        self.events.append(event)
        how = ", ".join(f"stage {k}: {v}" for k, v in event.get("how", {}).items())
        if chosen == "reload":
            self.log(ev.RESTORED, f"every stage reloaded step {self.step} ({event['rolled_back_steps']} step(s) rolled "
                     f"back) in {event['seconds']:.2f} s", **event)
        else:
            self.log(ev.RESTORED, f"{how}; survivors kept their weights, nothing rolled back; "
                     f"{event['seconds']:.2f} s", **event)
        return event

    def _reload_all(self, event: dict[str, Any]) -> None:
        """Every process back to the newest checkpoint (the group formed)."""
        ray.get([w.load.remote(self._checkpoint_url(stage_of(i, self.num_stages)[0]), self.last_checkpoint)
                 for i, w in enumerate(self.workers)])
        event["rolled_back_steps"] = self.step - self.last_checkpoint
        self.step = self.last_checkpoint

    def _probe(self, plans: list[cf.StageRecovery], policy: StageRecoveryPolicy, event: dict[str, Any]) -> float:
        """The rebuilt pipeline's loss on the last step's batch against the loss that step recorded
        (before its update): the bump the rebuild causes. The policy then chooses again with it."""
        bump = self.evaluate([self.model.batch(self.step - 1)]) - self.history[-1]["loss"]
        event["chosen"], event["reason"] = policy.choose(plans, self._auto_inputs(bump))
        event["probe_bump"] = bump
        self.log(ev.RESTORE_PLAN, f"stage(s) {event['lost']} rebuilt at step {self.step}, measured: {event['reason']}",
                 **event)
        return bump

    def _auto_inputs(self, bump: float | None = None) -> cf.AutoInputs:
        """What auto weighs; ``bump``: measured after a rebuild (which is then spent either way)."""
        recent = self._step_seconds[-20:]
        measured = bump is not None and self.tracker.steps_per_bump is not None
        return cf.AutoInputs(
            step_seconds=(sum(recent) / len(recent) if recent else 0.0) or 1e-3,
            steps_since_snapshot=None if self.last_checkpoint is None else self.step - self.last_checkpoint,
            reload_seconds=self._recover_seconds.get("reload", 0.0),
            rebuild_seconds=0.0 if measured else self._recover_seconds.get("rebuild", 0.0),
            recovery_steps=self.tracker.recovery_steps, recovery_steps_measured=self.tracker.events > 0,
            measured_bump=bump if measured else None, steps_per_bump=self.tracker.steps_per_bump if measured else None,
            steps_per_bump_measured=bool(self.tracker.measured))

    def _survivor(self, stage: int, lost: list[int]) -> int:
        """A surviving process of ``stage`` (its replicas are identical, so any will do)."""
        return next(r for r in (self.rank(stage, i) for i in range(self.replicas)) if r not in lost)

    def _inits(self, plans: list[cf.StageRecovery], lost: list[int], chosen: str,
               event: dict[str, Any]) -> dict[int, StageInit]:
        """Where each lost process gets its state. The sources put their state in the object
        store at once (in parallel); the new processes fetch it themselves."""
        n, how, weights = self.num_stages, event.setdefault("how", {}), {}
        grad_norms = self.history[-1]["grad_norms"] if self.history else [0.0] * n
        calls: dict[tuple[int, str], Any] = {}  # (source rank, what) -> its ray.put reference, to come

        def ref(rank: int, what: str) -> tuple[int, str]:
            if (rank, what) not in calls:
                w = self.workers[rank]
                calls[(rank, what)] = (w.share_replica.remote() if what == "edge" else
                                       w.share_state.remote(full=what == "full"))
            return rank, what

        wanted: dict[int, tuple[str, tuple[tuple[int, str], ...], tuple[int, str] | None, tuple[float, float]]] = {}
        for p in plans:
            s = p.stage
            if p.action is cf.RecoveryAction.COPY_REPLICA:
                src = self._survivor(s, lost)
                wanted[s] = ("replica", (ref(src, "full"),), None, (0.0, 0.0))
                how[s] = f"copy replica (rank {src}'s full state)"
            elif chosen == "random":
                wanted[s] = ("random", (), None, (0.0, 0.0))
                how[s] = "random"
            elif p.action is cf.RecoveryAction.COPY_NEIGHBOR or chosen == "copy":
                partner = p.sources[0] if p.action is cf.RecoveryAction.COPY_NEIGHBOR else s - 1
                src = self._survivor(partner, lost)
                edge = ref(src, "edge") if p.action is cf.RecoveryAction.COPY_NEIGHBOR else None
                wanted[s] = ("copy", (ref(src, "model"),), edge, (0.0, 0.0))
                how[s] = f"copy stage {partner}" + (" + edge replica" if edge else "")
            else:
                gp, gn = grad_norms[s - 1], grad_norms[s + 1]
                srcs = (ref(self._survivor(s - 1, lost), "model"), ref(self._survivor(s + 1, lost), "model"))
                wanted[s] = ("average", srcs, None, (gp, gn))
                how[s] = "average"
                weights[s] = cf.NeighborAverage(cf.NeighborAverageConfig(norm=self.cfg.norm)).weights(gp, gn)
        keys = list(calls)
        got = dict(zip(keys, ray.get([calls[k] for k in keys]))) if keys else {}
        if any(k[1] == "edge" and got[k] is None for k in keys):
            raise RuntimeError("the swap partner holds no replica of the lost edge stage's layers (replicate_every=0?)")
        if weights:
            event["weights"] = weights
        event["sources"] = {s: sorted({k[0] for k in w[1]} | ({w[2][0]} if w[2] else set())) for s, w in wanted.items()}
        seed = self.cfg.seed + 7919 * (self.step + 1)
        return {r: StageInit(w[0], tuple(got[k] for k in w[1]), got[w[2]] if w[2] else None, w[3], seed)
                for r in lost for w in [wanted[stage_of(r, n)[0]]]}

    def shutdown(self) -> None:
        for w in self.workers + self._spares:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(w)
        self.workers, self._spares = [], []


def _single_node() -> bool:
    try:
        return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:  # noqa: BLE001
        return True
