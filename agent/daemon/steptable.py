"""The step table (``GetStepTable``): where every array of a committed step lies in this node's
shared memory, merged over the snapshots of the step the agent holds, built once per step and
served to every rank of the node.

A restore after a failure is, at thousands of arrays, mostly per-array bookkeeping: each rank
listed the step's snapshots (one message each), decoded every writer's chunk index and merged
them into its own tables, and parsed the commit point's declarations, to learn where the
2,000-odd chunks it copies lie. Eight ranks of a node did the same work eight times, each a few
milliseconds. The agent does it once: it takes the step's commit point (its own copy, kept as the
step committed, else storage's), checks its seal, parses it, joins every array to its chunk in the
chunk indexes of the snapshots of that save, and answers with the arrays' paths, shapes and
dtypes and, per array, where its chunk lies and its crc32c, as columns of fixed-width integers a
rank takes in with a few C loops (:mod:`agent.trainer.table`). The rank still compares the
declarations with its own state and checks what it copies against crc32c: each chunk's, or,
where every chunk is small, the runs of chunks lying side by side that the agent checked chunk
by chunk as it built the table (:func:`_runs`).

Only the plain case has a table: every array of the step whole in one chunk, held in a segment
here, with a crc32c. Anything else (a sharded array, a chunk held nowhere on this node, a step not
committed, a table over a message) is NOT_FOUND with the reason, and the rank lists the
snapshots as before.
"""

from __future__ import annotations

import json
import logging
import threading
from array import array
from collections import OrderedDict
from operator import add, getitem
from typing import Any

import crc32c

from ckpt import SnapshotState
from ckpt import format as fmt
from ckpt.dtypes import info_by_name
from ckpt.gcpause import without_gc
from ckpt.manifest import MANIFEST_KEY

from ..errors import AgentNotFoundError
from ..pb import pb
from ..plan import decode_chunk_index
from .documents import StorageOf, chunk_index
from .snapshot import Snapshot

log = logging.getLogger(__name__)

_CACHED = 4  # steps whose tables are kept (a restore reads one; a few runs may share the agent)
_SLACK = 64 << 10  # framing beyond the table's own bytes
_LEFT_OUT = ("arrays", "writer_runs")  # of the manifest: the table says what a restore needs of them
_RUN_BELOW = 64 << 10  # runs are recorded when every chunk is smaller (a rank copies those out of the mapping)
_RUN_GAP = 4 << 10  # chunks at most this far apart are one run


def _runs(held: list[Snapshot], paths: list[str], columns: tuple[array, ...], step: int) -> tuple[array, ...]:
    """The runs of chunks side by side in each segment and each run's crc32c, after every chunk
    was checked against the crc32c its writer recorded. The runs' bytes are read first: any
    change after that read is seen by the rank that checks them; any change before it, by the
    chunks' check."""
    _kind_of, segment_of, offsets, sizes, crcs = columns
    views = []
    for s in held:
        if s.segment.mm is None:
            raise AgentNotFoundError(f"step {step} of {s.writer} is no longer mapped here")
        views.append(memoryview(s.segment.mm))
    runs: list[list[int]] = []  # [segment, start, end]
    for seg, start, size in sorted(zip(segment_of, offsets, sizes)):
        if runs and runs[-1][0] == seg and start - runs[-1][2] <= _RUN_GAP:
            runs[-1][2] = max(runs[-1][2], start + size)
        else:
            runs.append([seg, start, start + size])
    run_crcs = array("I", [crc32c.crc32c(views[seg][a:b]) for seg, a, b in runs])
    chunks = tuple(map(crc32c.crc32c, map(getitem, map(views.__getitem__, segment_of),
                                           map(slice, offsets, map(add, offsets, sizes)))))
    if chunks != tuple(crcs):
        bad = next(i for i, (a, b) in enumerate(zip(chunks, crcs)) if a != b)
        raise AgentNotFoundError(f"array {paths[bad]!r} of step {step} does not match its crc32c in this node's memory")
    return (array("I", [r[0] for r in runs]), array("Q", [r[1] for r in runs]), array("Q", [r[2] for r in runs]),
            run_crcs)


class NotWhole(AgentNotFoundError):
    """A step with an array in more than one chunk (sharded, or chunked by size): no table, and
    the later steps of its run are not prepared either (they are saved alike)."""


def _signature(snaps: list[Snapshot]) -> tuple:
    return tuple((id(s), s.save_id, s.segment.name, s.chunk_index_crcs) for s in snaps)


def _commit_point(snaps: list[Snapshot], storage: StorageOf, run_url: str, step: int) -> bytes:
    """The step's commit point: the copy a snapshot of it holds (set as the agent committed it, or
    read once when told of its commit: no read of storage per step and node), else storage's."""
    held = next((s.commit_point for s in snaps if s.commit_point and s.state == SnapshotState.COMMITTED), b"")
    if held:
        return held
    try:
        return storage(run_url).read(f"{fmt.step_dir(step)}/{fmt.META}")
    except Exception as e:  # noqa: BLE001 - retention removed it, or storage cannot be read
        raise AgentNotFoundError(f"step {step} is not committed here (no commit point: {type(e).__name__})") from None


@without_gc  # (tens of thousands of objects: a collection would walk the agent's whole heap)
def build(snaps: list[Snapshot], storage: StorageOf, run_url: str, step: int, max_bytes: int) -> pb.StepTable:
    """The table of ``step`` from the snapshots ``snaps`` held of it; AgentNotFoundError says why
    there is none."""
    path = f"{fmt.step_dir(step)}/{fmt.META}"
    data = _commit_point(snaps, storage, run_url, step)
    doc = fmt.parse_root(data, path, zarr_metadata=False)  # its seal checked
    attributes = doc.get("attributes")
    manifest = attributes.get(MANIFEST_KEY) if type(attributes) is dict else None
    if type(manifest) is not dict or type(manifest.get("arrays")) is not list or manifest.get("step") != step:
        raise AgentNotFoundError(f"{path} is not a commit point of step {step}")
    whole = []  # (path, shape, dtype, chunk key): every array first (a sharded step is refused before any index)
    for a in sorted(manifest["arrays"], key=lambda a: a.get("path") if type(a) is dict else ""):
        if type(a) is not dict or type(a.get("path")) is not str:
            raise AgentNotFoundError(f"{path} declares an array without a path")
        p, shape, dtype = a["path"], a.get("shape"), a.get("dtype")
        if not (p.isprintable() and type(shape) is list and shape == a.get("chunk_shape") and 0 not in shape
                and all(type(d) is int and d > 0 for d in shape) and type(dtype) is str):
            raise NotWhole(f"array {p!r} of step {step} is not whole in one chunk")
        info_by_name(dtype)  # a dtype this library knows
        whole.append((p, tuple(shape), dtype, p + fmt.chunk_key("", [0] * len(shape), a.get("chunk_separator", "/"))))
    save_id = manifest.get("save_id")
    held = [s for s in snaps if s.save_id == save_id]
    where: dict[str, tuple[int, int, int, int | None]] = {}  # chunk key -> (segment, offset, bytes, crc32c)
    for i, s in enumerate(held):
        index = decode_chunk_index(chunk_index(s, storage), s.segment.tensor)  # every span inside its segment
        where.update((rel, (i, offset, nbytes, crc)) for rel, offset, nbytes, crc in index.spans)
    kinds: dict[tuple[tuple[int, ...], str], int] = {}
    paths: list[str] = []
    columns: tuple[array, ...] = (array("I"), array("I"), array("Q"), array("Q"), array("I"))
    kind_of, segment_of, offsets, sizes, crcs = columns
    for p, shape, dtype, key in whole:
        hit = where.get(key)
        if hit is None or hit[3] is None:
            raise AgentNotFoundError(f"array {p!r} of step {step} is not held whole on this node with its crc32c")
        paths.append(p)
        kind_of.append(kinds.setdefault((shape, dtype), len(kinds)))
        segment_of.append(hit[0])
        offsets.append(hit[1])
        sizes.append(hit[2])
        crcs.append(hit[3])
    runs = _runs(held, paths, columns, step) if sizes and max(sizes) < _RUN_BELOW else (array("I"),) * 4
    head = {k: v for k, v in manifest.items() if k not in _LEFT_OUT}
    table = pb.StepTable(
        step=step, save_id=save_id, manifest=json.dumps(head, separators=(",", ":")).encode(),
        paths="\n".join(paths).encode(), kinds=json.dumps([[list(s), d] for s, d in kinds]).encode(),
        kind_of=kind_of.tobytes(), segment_of=segment_of.tobytes(), offsets=offsets.tobytes(),
        sizes=sizes.tobytes(), crc32c=crcs.tobytes(), run_segment=runs[0].tobytes(), run_start=runs[1].tobytes(),
        run_end=runs[2].tobytes(), run_crc32c=runs[3].tobytes(),
        segments=[pb.TableSegment(key=pb.SnapshotKey(run_url=s.run_url, writer=s.writer, step=s.step),
                                  save_id=s.save_id, segment=s.segment.name, nbytes=s.nbytes, replica=s.replica)
                  for s in held])
    if table.ByteSize() + _SLACK > max_bytes:
        raise AgentNotFoundError(f"the table of step {step} would be {table.ByteSize()} bytes, over the agent's "
                                 f"max_message_bytes of {max_bytes}: list the snapshots instead")
    return table


class StepTables:
    """The tables of the last few steps asked for, each built once for as long as the snapshots
    it is built from are held unchanged (concurrent askers of one step wait for one build)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent  # an agent.daemon.core.Agent
        self._lock = threading.Lock()
        # (run, step) -> (the snapshots' signature, the table or why there is none)
        self._tables: OrderedDict[tuple[str, int], tuple[tuple, pb.StepTable | AgentNotFoundError]] = OrderedDict()
        self._pending: set[tuple[str, int]] = set()
        self._not_whole: set[str] = set()  # runs whose steps have no table (sharded): not prepared as they commit

    def soon(self, run_url: str, step: int) -> None:
        """A step just committed here: build its table in the background, so that the restore
        after a failure finds it built (about 10 ms of one core at 2,000 arrays, once per step
        per node) rather than every rank of the node waiting on its build."""
        with self._lock:
            if (run_url, step) in self._pending or (run_url, step) in self._tables or run_url in self._not_whole:
                return
            self._pending.add((run_url, step))
        threading.Thread(target=self._prepare, args=(run_url, step), name="agent-step-table", daemon=True).start()

    def _prepare(self, run_url: str, step: int) -> None:
        try:
            self.get(run_url, step)
        except NotWhole:  # its later steps are saved alike: not prepared (a restore still asks, and learns why)
            with self._lock:
                if len(self._not_whole) < 1 << 12:
                    self._not_whole.add(run_url)
        except AgentNotFoundError:
            pass  # no table (kept with its reason): restores of the step list its snapshots
        except Exception:  # (any error: a restore asks again, and learns why)
            log.warning("cannot build the table of step %d of %s", step, run_url, exc_info=True)
        finally:
            with self._lock:
                self._pending.discard((run_url, step))

    def get(self, run_url: str, step: int) -> pb.StepTable:
        snaps = [s for s in self.agent.snapshots(run_url) if s.step == step and s.state != SnapshotState.FAILED]
        if not snaps:
            raise AgentNotFoundError(f"no snapshot of step {step} of {run_url} is held here")
        signature = _signature(snaps)
        with self._lock:  # the ranks of a node ask at once: one builds, the others wait for it
            cached = self._tables.get((run_url, step))
            if cached is None or cached[0] != signature:
                try:
                    built: pb.StepTable | AgentNotFoundError = build(snaps, self.agent.storage, run_url, step,
                                                                     self.agent.config.max_message_bytes)
                    log.debug("step table of step %d of %s: %d arrays in %d segments", step, run_url,
                              len(built.sizes) // 8, len(built.segments))
                except AgentNotFoundError as e:  # (kept too: every rank of the node would ask again)
                    built = e
                except Exception as e:  # noqa: BLE001 - a document the restore's own checks then refuse, with their message
                    built = AgentNotFoundError(f"no table of step {step}: {type(e).__name__}: {e}")
                cached = self._tables[(run_url, step)] = (signature, built)
                while len(self._tables) > _CACHED:
                    self._tables.popitem(last=False)
            self._tables.move_to_end((run_url, step))
        if isinstance(cached[1], AgentNotFoundError):
            raise type(cached[1])(*cached[1].args)  # (a new one per asker: they raise it in their threads)
        return cached[1]
