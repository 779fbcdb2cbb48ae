"""Stopping an attempt in place: which workers the failure took (killed and replaced), which
keep their processes (interrupted, kept for the next attempt), and, for policy ``heal``, what
live training state each of those holds.

The functions act on a :class:`recovery.job.WorkerJob` (its workers, placement, run calls).
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from . import events as ev
from .detect import HANG, NODE_DIED
from .errors import NoRoomError
from .live import LiveState

log = logging.getLogger(__name__)
WorkerJob = Any  # recovery.job.WorkerJob, a layer above this module


def kill(worker: Any) -> None:
    try:
        ray.kill(worker, no_restart=True)
    except Exception:  # already gone
        log.debug("killing a worker that is already gone", exc_info=True)


# Failures whose ranks' processes are gone or must go (a hang: the culprits); for the other kinds
# (a train_fn that raised, an agent that died, storage) every worker process is still sound.
_REPLACE = {"worker_died", "node_died", "hang", "straggler"}


def lost_ranks(job: WorkerJob) -> set[int] | None:
    """The ranks the failure took, to be replaced; None: every worker is replaced."""
    f, workers = job.failure, job.workers
    if job.growing and workers:
        return set()  # growing back: every rank stops at a step boundary and is kept
    if f is None or not workers:
        return None
    on_lost = {r for r, n in job.rank_node.items() if n in job.placement.lost_nodes}
    if f.kind == NODE_DIED or on_lost:
        if not job.keep_state:
            return None  # a grown or lost node: new bundles, new workers
        replace = set(f.ranks) | on_lost  # heal: the ranks on other nodes keep their state
    elif f.kind == HANG:
        # The culprits, when the others can be told from them; else every stalled rank is asked to
        # stop: those waiting in a collective are freed by the interrupt, the stuck are replaced.
        replace = set(f.culprits) if len(f.culprits) < len(workers) else set()
    else:
        replace = set(f.ranks) if f.kind in _REPLACE else set()
    if len(replace) >= len(workers):
        return None
    if not job.keep_state and any(job.placement.node_lost(n) for n in
                                  {job.rank_node.get(r) for r in replace} if n is not None):
        return None  # a process died with its node (seen before Ray or the launcher called it a node loss)
    return replace


def survivors(job: WorkerJob) -> dict[int, Any]:
    """Stop ``job``'s attempt in place: kill what the failure took, interrupt the others; the
    workers (rank -> actor) whose ``run`` ended and whose process lives on, and the
    replacements booting for the others (``job.fresh``). With ``job.keep_state`` (policy heal)
    the interrupt waits for a step boundary first and only then raises anywhere (the state of
    a worker stopped so is doubtful, see :mod:`recovery.live`)."""
    job.stuck = {}
    replace = lost_ranks(job)
    if replace is None:
        return {}
    workers = job.workers
    for r in replace:  # first: their peers blocked in a collective with them fail at once
        kill(workers[r])
    # Their replacements boot (a process, imports) while the others stop and the agents settle.
    fresh = {r: job.new_worker(r, len(workers), job.attempt + 1, in_place=True) for r in replace}
    alive = {r: w for r, w in enumerate(workers) if r not in replace}
    calls = {w.interrupt.remote(job.attempt, job.keep_state): r for r, w in alive.items()}
    runs = {ref: r for ref, r in job.run_refs.items() if r in alive}
    timeout = job.config.interrupt_timeout_s
    ready, _ = ray.wait(list(runs), num_returns=len(runs), timeout=timeout) if runs else ([], [])
    # (these return at once, unless the machine is loaded: a survivor whose answer is late would
    # be taken for one whose process died with the others)
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=max(1.0, timeout))
    if job.keep_state and len(ready) < len(runs):
        # not at a step boundary within the timeout: interrupted anywhere now (state doubtful)
        late = [runs[ref] for ref in set(runs) - set(ready)]
        ray.wait([alive[r].force_interrupt.remote(job.attempt) for r in late], num_returns=len(late), timeout=1.0)
        more, _ = ray.wait([ref for ref in runs if ref not in ready], num_returns=len(late), timeout=2.0)
        ready = list(ready) + list(more)
    kept: dict[int, Any] = {}
    for ref in done:
        try:
            ray.get(ref)
            kept[calls[ref]] = alive[calls[ref]]
        except RayError:
            pass  # its process died too
    for ref in set(runs) - set(ready):
        r = runs[ref]  # still running after the interrupt (stuck outside Python): replaced
        try:
            job.stuck[r] = ray.get(alive[r].stack.remote(), timeout=2)
        except (RayError, GetTimeoutError):
            job.stuck[r] = "(no answer)"

        if kept.pop(r, None) is not None:
            kill(alive[r])
            fresh[r] = job.new_worker(r, len(workers), job.attempt + 1, in_place=True)
    for ref in ready:
        try:
            ray.get(ref)  # INTERRUPTED, or what a rank that had finished returned: it trains again
        except RayActorError:
            kept.pop(runs[ref], None)
        except RayError:
            pass  # train_fn failed (a collective with a lost peer): the process is sound
    job.fresh = set(fresh)
    return kept | fresh


def live_states(job: WorkerJob) -> dict[int, LiveState]:
    """What each survivor kept in place (not the replacements) says of its live state."""
    ranks = sorted(set(job.kept) - job.fresh)
    refs = [job.kept[r].live_report.remote() for r in ranks]
    out: dict[int, LiveState] = {}
    for r, ref in zip(ranks, refs):
        try:
            out[r] = LiveState.from_dict(ray.get(ref, timeout=10))
        except (RayError, GetTimeoutError):
            kill(job.kept.pop(r))  # it does not answer: replaced like a lost one
            job.fresh.add(r)
            job.kept[r] = job.new_worker(r, job.world_size, job.attempt + 1, in_place=True)
    return out


def replacements_started(job: WorkerJob, timeout_s: float) -> bool:
    """Whether every replacement booting in ``job.kept`` started within ``timeout_s``."""
    fresh = [job.kept[r] for r in sorted(job.fresh)]
    if not fresh:
        return True
    try:
        ray.get([w.node_info.remote() for w in fresh], timeout=timeout_s)
        return True
    except (RayError, GetTimeoutError):
        return False


def bundle_for(job: WorkerJob, rank: int) -> int:
    """Rank ``rank``'s bundle: its own number, unless ranks were given bundles of their own (a heal
    that shrank the job renumbered them, the job grew into a group reserved for new ranks): then
    the bundle it had, or its own number if free and placed, or the first free bundle placed on a
    live node, or the first free one."""
    if not job.bundles or rank in job.bundles:
        return job.bundles.get(rank, rank)
    pl = job.placement
    used = {b for r, b in job.bundles.items() if r != rank} | job.spares.bundles()
    free = [b for b in range(max(pl.bundle_count(), rank + 1)) if b not in used]
    on_live = pl.placed_bundles() if len(free) > 1 else set(free)
    placed = [b for b in free if b in on_live]
    # (none free: its own number, held by another; its start times out and every worker is replaced)
    job.bundles[rank] = rank if rank in placed else (placed or free or [rank])[0]
    return job.bundles[rank]


BOOT_PRIOR_S = 3.0  # a worker process's boot (Python, torch, the job's modules), until a spare's is measured


def boot_ahead_pays(job: WorkerJob, need: int, want: int, next_chance_s: float | None = None) -> tuple[bool, str]:
    """Whether booting ``need`` new ranks ahead, training going on meanwhile and the job growing
    once they are up, costs less than growing now, every rank waiting for their boot: what the
    job goes without from their boot to its next chance to grow (``next_chance_s``; None: the
    next checkpoint, ``interval x need / want`` of its ranks' time) against the boot (``boot_s``
    of every rank's). A sentence with the figures."""
    boot = statistics.median(job.spares.boot_s) if job.spares.boot_s else BOOT_PRIOR_S
    if next_chance_s is not None:  # (heal grows at the first poll after they are up)
        return next_chance_s * need / want < boot, (f"the job grows {next_chance_s:.1f} s after they are up, "
                                                     f"a boot of ~{boot:.1f} s")
    commits = [e.t for e in job.events.of_kind(ev.CHECKPOINT)][-6:]
    gaps = [b - a for a, b in itertools.pairwise(commits)]
    interval = statistics.median(gaps) if gaps else math.inf
    return interval * need / want < boot, (f"a checkpoint every {interval:.1f} s with {need} of {want} ranks "
                                           f"missing, a boot of ~{boot:.1f} s")


def grows_only_in_place(job: WorkerJob) -> bool:
    """Whether ``job`` grows back in place or not at all: where :func:`room_to_grow` can answer (in
    place, a group placed, a strategy that a second group keeps), a restart of every worker needs the
    same free room it looked for, so it is never the fallback: a second look a moment later could
    see room the first did not (freed between the two) and restart every worker for nothing."""
    return (job.config.in_place and job.placement.pg is not None
            and not job.placement.config.placement_strategy.startswith("STRICT_"))


def room_to_grow(job: WorkerJob, want: int, next_chance_s: float | None = None) -> bool:
    """Whether ``job`` grows back to ``want`` ranks in place now, its survivors kept: a bundle on a
    live node, used by no rank, for each missing rank, and, where :func:`boot_ahead_pays`, a
    process booted ahead in each. A heal that shrank keeps the lost ranks' bundles, and Ray
    places a lost node's bundles again once room returns; a ready hot spare takes a rank with
    its bundle; for the others a group of their own is reserved
    (:meth:`recovery.placement.Placement.reserve`, while ``job.placement.reserving`` it is
    being placed), with the hot spares' bundles too where there is room, where the cluster has
    the room and the job's placement strategy is not a strict one (``STRICT_PACK`` and
    ``STRICT_SPREAD`` hold within one group only). The new ranks boot ahead as hot spares
    (:meth:`recovery.spares.Spares.boot_ahead`, ``job.spares.ahead_since``) and are taken once up
    (``next_chance_s``: the policy's, see :func:`boot_ahead_pays`)."""
    pl, spares = job.placement, job.spares
    if not job.config.in_place or pl.pg is None or want <= job.world_size:
        return False
    need = want - job.world_size
    if spares.ahead_since is not None:
        if spares.ready() >= need:
            return True
        if time.monotonic() - spares.ahead_since < max(60.0, 2 * job.config.placement_timeout_s):
            return False  # still booting
        spares.stop_ahead()
        job.log(ev.RESIZED, f"the {need} new rank(s) booting ahead did not come up in time: growing with new "
                "processes", wanted=want)
        return True
    if pl.reserving and not pl.reserve(need):  # (only looked at: its size was set when asked for)
        return False
    used = {job.bundles.get(r, r) for r in range(job.world_size)} | spares.bundles()
    missing = need - len(pl.placed_bundles() - used) - len(spares.idle)
    if missing > 0 and pl.config.placement_strategy.startswith("STRICT_"):
        if pl.free() >= missing:  # (the policy grows by restarting every worker)
            job.log(ev.RESIZED, f"not growing in place: a placement group of their own for the {missing} new rank(s) "
                    f"would not keep placement_strategy={pl.config.placement_strategy} (Ray keeps it within one "
                    "group): every worker restarts on a new group", wanted=want, in_place=False)
        return False
    if missing > 0:
        free = pl.free()
        if free < missing or pl.refused():
            return False  # no room for them now
        # and bundles for the hot spares the job keeps (RunConfig.spares), where there is room beyond the ranks
        missing = min(free, max(missing, want + job.config.spares - pl.bundle_count()))
    if missing > 0 and not pl.reserve(missing):
        return False
    pays, why = boot_ahead_pays(job, need, want, next_chance_s)
    if spares.ready() >= need or not pays:
        return True
    spares.boot_ahead(need)
    when = "as soon as" if next_chance_s is not None else "at the first checkpoint after"
    job.log(ev.RESIZED, f"booting {need} new rank(s) ahead in free bundles while training goes on; the job grows "
            f"back {when} they are up ({why})", wanted=want, ahead=need)
    return False


def boot_growth(job: WorkerJob, want: int, policy: str) -> None:
    """Boot a worker for each rank of ``range(want)`` that ``job.kept`` lacks (a hot spare if one
    is ready, else a new actor in a free placed bundle), as replacements booted ahead
    (``job.fresh``); ``policy`` (heal: they copy a survivor's live state, reload: every rank
    restores the newest checkpoint) for the event."""
    kept = sorted(job.kept)
    job.bundles = {r: job.bundles.get(r, r) for r in kept}
    job.placement.world = want
    new = [r for r in range(want) if r not in job.kept]
    free = sorted(job.placement.placed_bundles() - set(job.bundles.values()) - job.spares.bundles())
    for rank in new:  # (one look at the groups for all of them; a rank a hot spare takes gets the spare's)
        if free:
            job.bundles[rank] = rank if rank in free else free[0]
            free.remove(job.bundles[rank])
    for rank in new:
        job.kept[rank] = job.new_worker(rank, want, job.attempt + 1)
        job.fresh.add(rank)
    job.spares.stop_ahead()
    how = "copy a survivor's live state" if policy == "heal" else "restore the newest checkpoint with the others"
    job.log(ev.RESIZED, f"growing back in place from {len(kept)} to {want} workers: rank(s) {new} boot in free "
            f"bundles ({sorted(job.bundles[r] for r in new)}) and {how}; the {len(kept)} others keep their "
            "processes", world_size=want, wanted=want, policy=policy, grow=True, bundles={r: job.bundles[r] for r in new})


def give_up_replacements(job: WorkerJob, source: int, current: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """The replacements booting in ``job.kept`` did not start: kill them and go on with the
    survivors, renumbered ``0..``, keeping their bundles (removing the group would kill them);
    ``source`` and ``current`` renumbered. ``NoRoomError`` if fewer than ``min_workers`` remain."""
    cfg = job.config
    gone = sorted(job.fresh)
    for r in gone:
        kill(job.kept.pop(r))
    stay = sorted(job.kept)
    job.fresh = set()
    if len(stay) < cfg.min_workers:
        raise NoRoomError(f"the replacement(s) of rank(s) {gone} did not start within placement_timeout_s="
                          f"{cfg.placement_timeout_s:g} s and {len(stay)} survivor(s) are fewer than "
                          f"min_workers={cfg.min_workers}")
    new = {old: i for i, old in enumerate(stay)}
    job.kept = {new[old]: job.kept[old] for old in stay}
    job.bundles = {new[old]: job.bundles.get(old, old) for old in stay}
    # Count only the bundles in use, so that the room for more is the cluster's free room
    # (allow_grow) and the free bundles kept (room_to_grow), not theirs.
    job.placement.world = len(stay)
    job.log(ev.RESIZED, f"the replacement(s) of rank(s) {gone} did not start within placement_timeout_s="
            f"{cfg.placement_timeout_s:g} s: continuing with the {len(stay)} survivors, no rollback "
            f"(ranks renumbered {dict(new)})", world_size=len(stay), wanted=job.world_size, renumbered=new,
            policy="heal")
    return new[source], tuple(new[r] for r in current if r in new)


def tend_spares(job: WorkerJob) -> None:
    """Boot hot spares in the bundles no rank and no spare uses, up to ``job.spares.count`` (the
    job's own, plus new ranks booting ahead of a grow back), placed ones first, with a node agent
    on each node a spare boots on (started while it boots: the rank it takes then waits for
    neither); and warm standbys on the job's nodes, up to ``RunConfig.standby`` each."""
    pl, spares, standbys = job.placement, job.spares, job.standbys
    job.fleet.settle()  # agents started beside spares booting, once up
    if standbys.per_node:
        for sb in standbys.newly_ready():
            job.log(ev.SPARE, f"warm standby ready on node {sb.node[:12]} (pid {sb.pid}, booted in "
                    f"{time.monotonic() - sb.booted_at:.1f} s)", node=sb.node, pid=sb.pid, standby=True)
        if booted_on := standbys.tend(set(job.rank_node.values()), pl.lost_nodes):
            job.log(ev.SPARE, f"booting {len(booted_on)} warm standby(s) on {len(set(booted_on))} node(s)",
                    standby=True, nodes=len(set(booted_on)))
    if not spares.count or pl.pg is None:
        return
    ready = spares.newly_ready()
    for sp in ready:
        job.log(ev.SPARE, f"hot spare in bundle {sp.bundle} ready on node {(sp.node or '?')[:12]} (pid {sp.pid}, "
                f"booted in {time.monotonic() - sp.booted_at:.1f} s)", bundle=sp.bundle, node=sp.node, pid=sp.pid)
    _agents_for(job, {sp.node for sp in ready if sp.node})  # (one booted in a bundle placed only since)
    if len(spares.idle) >= spares.count:
        return
    used = {job.bundles.get(r, r) for r in range(job.world_size)} | spares.bundles()
    free = [b for b in range(pl.bundle_count()) if b not in used]
    if len(free) > spares.count - len(spares.idle):  # placed ones first (a lost node's wait)
        on_live = pl.placed_bundles()
        free.sort(key=lambda b: b not in on_live)
    if booted := spares.tend(pl.pg, free):
        job.log(ev.SPARE, f"booting {len(booted)} hot spare(s) in bundle(s) {booted}", booted=booted,
                idle=len(spares.idle))
        _agents_for(job, pl.nodes_of(set(booted)))  # while they boot, not once they are up


def _agents_for(job: WorkerJob, nodes: set[str]) -> None:
    """A node agent on each of ``nodes`` that has none, for the hot spares there: started (not
    waited for: the driver's loop goes on, :func:`tend_spares` registers it once up) before a
    spare takes a rank, so that every rank does not wait for it then."""
    if nodes := nodes - set(job.fleet.agents):
        try:
            job.fleet.start(nodes)
        except RayError:  # the node died meanwhile: the spare's boot, or the rank's start, finds out
            log.warning("starting a node agent beside hot spares failed", exc_info=True)
