"""The restore-source conformance suite: what every tier of a restore must do.

```python
from ckpt.testing.restore_source import RestoreSourceTests

class TestMyTier(RestoreSourceTests):
    def make(self, storage, step, tmp_path):
        return MyTier(storage, ...)        # a RestoreSource over ``storage`` holding ``step``
```

``make`` gets a run holding one committed step (saved by one writer in many chunks).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ..commit import commit
from ..format import META, read_manifest, step_dir, writer_name
from ..io import load_step, write_plan
from ..layouts import ChunkLayout, Location, Locator
from ..plan import plan_save
from ..restore import RestoreSource, StorageSource, Tier
from ..storage import LocalStorage, Storage

STEP = 4


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    return {"w": torch.randn(256, 96, generator=g), "i": torch.arange(5000, dtype=torch.int32),
            "h": torch.randn(33, 7, generator=g).to(torch.bfloat16), "note": "held"}


class RestoreSourceTests:
    """Subclass and implement :meth:`make`."""

    def make(self, storage: Storage, step: int, tmp_path: Any) -> RestoreSource:
        raise NotImplementedError

    def run(self, tmp_path: Any) -> Storage:
        storage = LocalStorage(str(tmp_path / "run"))
        plan = plan_save(state(), max_chunk_bytes=16 << 10)
        write_plan(storage, plan, step=STEP, writer=writer_name(0), save_id="tiers")
        commit(storage, STEP, [writer_name(0)], save_id="tiers")
        return storage

    def test_a_restore_through_it_is_exact(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else "" for k, v in state().items()}
        load_step(source, out, STEP, threads=source.read_threads(STEP, 4))
        for k, v in state().items():
            assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k

    def test_documents_and_steps_are_readable(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        assert step_dir(STEP) in source.list_dir("")
        assert source.read(f"{step_dir(STEP)}/{META}") == storage.read(f"{step_dir(STEP)}/{META}")
        assert read_manifest(source, STEP).save_id == read_manifest(storage, STEP).save_id

    def test_read_chunk_gives_the_stored_checksum_and_the_data(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        manifest = read_manifest(storage, STEP)
        spec = manifest.arrays["w"]
        locator = Locator(storage, STEP, ChunkLayout.of(manifest), manifest.arrays)
        key = locator.key("w", (0, 0))
        location = None if manifest.layout == "chunks" else locator.locate("w", (0, 0))
        nbytes = 4 * spec.chunk_shape[0] * spec.chunk_shape[1]
        data = memoryview(bytearray(nbytes))
        read = source.read_chunk(key, data, location)
        assert read.total == nbytes + 4 and read.stored_crc == read.actual_crc
        direct = bytearray(nbytes)
        StorageSource(storage).read_chunk(key, memoryview(direct), location)
        assert bytes(data) == bytes(direct)

    def test_a_missing_chunk_is_file_not_found(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        with pytest.raises(FileNotFoundError):
            source.read_chunk(f"{step_dir(STEP)}/nope/c.0", memoryview(bytearray(8)))
        with pytest.raises(FileNotFoundError):
            source.read_chunk(f"{step_dir(STEP)}/nope/c.0", memoryview(bytearray(8)),
                              Location(f"{step_dir(STEP)}/.packs/nobody.0", 0))

    def test_a_batch_reads_as_one_by_one_and_reports_a_missing_chunk_in_place(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        manifest = read_manifest(storage, STEP)
        locator = Locator(storage, STEP, ChunkLayout.of(manifest), manifest.arrays)
        items, expected = [], []
        for path in ("w", "i", "h"):
            spec = manifest.arrays[path]
            itemsize = getattr(torch, spec.dtype).itemsize
            last = tuple(g - 1 for g in spec.grid_shape)
            for index in dict.fromkeys([tuple(0 for _ in last), last]):
                nbytes = itemsize
                for c in spec.chunk_shape:
                    nbytes *= c
                location = None if manifest.layout == "chunks" else locator.locate(path, index)
                items.append((locator.key(path, index), memoryview(bytearray(nbytes)), location))
                direct = bytearray(nbytes)
                StorageSource(storage).read_chunk(items[-1][0], memoryview(direct), location)
                expected.append(bytes(direct))
        missing = (f"{step_dir(STEP)}/nope/c.0", memoryview(bytearray(8)), None)
        reads = source.read_chunk_batch([*items[:3], missing, *items[3:]])
        assert len(reads) == len(items) + 1 and isinstance(reads[3], FileNotFoundError)
        for (_key, data, _loc), read, want in zip(items, [*reads[:3], *reads[4:]], expected):
            assert read.total == data.nbytes + 4 and read.stored_crc == read.actual_crc
            assert bytes(data) == want

    def test_what_it_served_is_counted_per_tier(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else "" for k, v in state().items()}
        load_step(source, out, STEP)
        served = source.served()
        assert all(isinstance(t, Tier) for t in served)
        total = sum(v.numel() * v.element_size() for v in state().values() if isinstance(v, torch.Tensor))
        assert sum(served.values()) >= total  # every chunk counted once, by the tier that served it
        assert source.tiers()[0] is source and source.read_threads(STEP, 3) >= 1

    def test_every_chunk_it_sends_below_is_charged_to_a_fallback(self, tmp_path):
        storage = self.run(tmp_path)
        source = self.make(storage, STEP, tmp_path)
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else "" for k, v in state().items()}
        load_step(source, out, STEP)
        fallbacks = source.fallbacks()
        assert all(isinstance(f.tier, Tier) and f.tier is not Tier.STORAGE and f.detail for f in fallbacks)
        below = sum(n for f in fallbacks for n in f.read_instead.values())
        # a tier above storage never sends a read down silently; storage itself has nothing below
        assert below == (0 if source.tier is Tier.STORAGE else source.served().get(Tier.STORAGE, 0))
