"""``python -m tests.fault.crash_trials --trials 500 --jobs 3 --seed 0``: the crash harness's
command (see crash_harness). A module of its own, so that the processes the harness forks
find their code in an importable module rather than in ``__main__``."""

from __future__ import annotations

from tests.fault.crash_harness import main

if __name__ == "__main__":
    raise SystemExit(main())
