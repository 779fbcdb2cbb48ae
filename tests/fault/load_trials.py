"""``python -m tests.fault.load_trials --writers 16 --checkpoints 100``: the load run (see
load_harness). A module of its own so that forked writers find their code importable."""

from __future__ import annotations

from tests.fault.load_harness import main

if __name__ == "__main__":
    raise SystemExit(main())
