"""Retention when Ray Train owns it: which ckpt steps may go, and whose run a ckpt root is.

Ray Train's ``CheckpointConfig(num_to_keep=..., checkpoint_score_attribute=...)`` decides
which pointer checkpoints stay; ckpt's own retention is off (``keep_last=None``). What Ray
deletes is only the small pointer directory: the step's data goes when ckpt sees that Ray no
longer lists it. So ckpt never deletes a step Ray still lists, and Ray's deletion of a pointer
never deletes data ckpt still needs (a step saved but not yet reported is newer than every
listed one, and is kept).

:func:`steps_to_delete` is pure. The rules:

- During training: a committed step that Ray does not list and that is older than the newest
  step Ray lists (Ray always keeps its newest). Incomplete steps are left alone: a save of
  them may be in flight on another rank (``ckpt gc`` removes the stale ones).
- At restore, before any rank saves: every step, committed or not, that Ray does not list.
  Those are the steps of an attempt that died before reporting them: training resumes from
  the step Ray hands back and saves them again, from the resumed trajectory.

That second rule deletes steps Ray never heard of, so it must only ever run on a ckpt root
written by this very Ray Train run: :func:`claim_root` records the run's name in the root
(``ray_train_run.json``) and refuses a root that another run, or something else, wrote.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable

from ... import format as fmt
from ...errors import CkptError
from ...storage import Storage

OWNER_FILE = "ray_train_run.json"
OWNER_KIND = "ckpt-ray-train-run"


def steps_to_delete(steps: Iterable[fmt.StepInfo], listed: Collection[int], *, restoring: bool) -> list[int]:
    """The steps of a ckpt run to delete, oldest first, given the steps Ray lists."""
    listed = set(listed)
    if restoring:
        return sorted(s.step for s in steps if s.step not in listed)
    if not listed:
        return []
    newest = max(listed)
    return sorted(s.step for s in steps if s.committed and s.step not in listed and s.step < newest)


def claim_root(storage: Storage, experiment: str) -> None:
    """Make sure the ckpt root at ``storage`` belongs to the Ray Train run ``experiment``:
    claim it when it holds no step yet, accept it when this run claimed it, refuse otherwise."""
    try:
        doc = json.loads(storage.read(OWNER_FILE))
    except FileNotFoundError:
        steps = fmt.list_steps(storage)
        if steps:
            raise CkptError(
                f"{storage.url} already holds checkpoints (steps {steps[0].step}..{steps[-1].step}) that this Ray "
                f"Train run ({experiment!r}) did not write: give every Ray Train run its own ckpt root (a new run "
                "can still start from another run's pointer: see RayTrainReporter.restore)"
            ) from None
        storage.write_atomic(OWNER_FILE, json.dumps({"kind": OWNER_KIND, "experiment": experiment}).encode())
        return
    except ValueError as e:
        raise CkptError(
            f"{storage.url}/{OWNER_FILE} is not valid JSON ({e}): remove it only if no other Ray Train "
            "run writes into this root"
        ) from None
    owner = doc.get("experiment") if isinstance(doc, dict) else None
    if owner != experiment:
        raise CkptError(
            f"{storage.url} belongs to the Ray Train run {owner!r}, not to this one ({experiment!r}): two runs "
            "writing one root would delete each other's steps. Give this run its own ckpt root (it can still "
            "start from the other run's pointer: see RayTrainReporter.restore)"
        )
