"""The simulated writers of ``benchmarks/bench_scale.py`` write what a writer writes: their
fragments are byte for byte a writer's of the same records (format 4), and the registry commits
them, reading each once, without a listing or a poll."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ckpt import format as fmt
from ckpt.manifest import Fragment
from ckpt.storage import open_storage
from recovery.registry import CheckpointRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from scale_storage import SAVE, STEP, Counting, SimulatedWriters


def test_a_simulated_fragment_is_what_a_writer_writes_and_commits():
    sim = SimulatedWriters(open_storage("memory://bench-scale-sim"), 8, 12)
    data = sim.fragment(5)
    frag = fmt.read_fragment(sim, STEP, sim.writers[5])
    assert all(r.index == (5, 0) for recs in frag.chunks.values() for r in recs) and len(frag.chunks) == 12
    again = Fragment(**{f: getattr(frag, f) for f in Fragment.__dataclass_fields__ if f != "table"})
    assert fmt.dumps(fmt.seal_fragment(again.to_dict())) == data
    st = Counting(sim)
    reg = CheckpointRegistry(st, rescan_after_s=3600)
    reg.saving(STEP, SAVE, sim.writers, attempt=0)
    for w in sim.writers:
        reg.fragment_ready(STEP, SAVE, w)
    assert [c.step for c in reg.poll().committed] == [STEP]
    assert reg.fragment_reads == 8 and st.ops["GET"] == 8 and st.ops["LIST"] == 1 and st.ops["PUT"] == 1
    root = json.loads(st.read(f"{fmt.step_dir(STEP)}/{fmt.META}"))
    runs = root["attributes"]["ckpt"]["writer_runs"]
    assert len(runs) == 12 and all(r == [[0, 8, 0, 1, 1]] for r in runs.values())
