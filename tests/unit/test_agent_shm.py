"""A slab's mapping outlives every tensor that views it: giving a slab back never leaves a live
view pointing at unmapped memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a child process: before the fix, the view's next touch was a segfault, which would take the
# whole test run down with it.
_CHILD = textwrap.dedent("""
    import gc, os, sys, types, weakref
    from agent.trainer.sink import ShmAllocator

    shm_dir = sys.argv[1]
    released = []

    class Client:
        def lease(self, session, nbytes):
            with open(os.path.join(shm_dir, "seg0"), "wb") as f:
                f.truncate(nbytes)
            return types.SimpleNamespace(segment="seg0")

        def release(self, session, segment):
            released.append(segment)

    sink = types.SimpleNamespace(client=Client(), session_id="s", shm_dir=shm_dir, closed=False)
    alloc = ShmAllocator(sink)
    buf, handle = alloc.allocate(1 << 16, pin_memory=False)
    mapping = weakref.ref(alloc._maps[handle][0])
    view = buf[100:200]
    view.fill_(7)
    alloc.free(buf, handle)
    del buf
    gc.collect()
    assert released == ["seg0"], released
    assert mapping() is not None, "unmapped under a live view"
    assert int(view.sum()) == 700, int(view.sum())  # readable: still mapped
    view.fill_(1)  # and writable
    del view
    gc.collect()
    assert mapping() is None, "the last view is gone: the mapping must go with it"
    buf2, h2 = alloc.allocate(1 << 16, pin_memory=False)
    alloc.close()  # a slab still mapped at close: its views keep it too
    assert int(buf2[:10].sum()) == 0
    print("ok")
""")


def test_a_view_of_a_freed_slab_keeps_its_mapping_until_it_dies(tmp_path):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
