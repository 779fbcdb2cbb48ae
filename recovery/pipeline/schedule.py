"""Which process runs what, for one micro-batch: the route of its activations through the
stage processes, in fixed order or in CheckFree+'s swapped order, and the ranks of a pipeline
with data-parallel replicas. Pure logic: no tensors, no processes.

A route is a list of hops ``(stage, parts)``; ``parts`` are the pieces of the stage's forward
that run there (``embed``, ``blocks``, ``head``). In fixed order every stage runs once, whole::

    [(0, (embed, blocks)), (1, (blocks,)), (2, (blocks,)), (3, (blocks, head))]

In CheckFree+'s swapped order (odd micro-batches, :func:`recovery.checkfree.execution_order`)
the first stage embeds, its partner's blocks run before its own, and the last stage's output
layer runs after the blocks of its partner, which ran after its own::

    [(0, (embed,)), (1, (blocks,)), (0, (blocks,)), (3, (blocks,)), (2, (blocks,)), (3, (head,))]

Every process walks the same routes in the same order (micro-batch by micro-batch, hop by hop;
backward in reverse), receiving from the hop before and sending to the hop after its own, so
the blocking point-to-point messages of all processes line up and none can deadlock.
"""

from __future__ import annotations

from ..checkfree.plan import execution_order

EMBED, BLOCKS, HEAD = "embed", "blocks", "head"

Hop = tuple[int, tuple[str, ...]]


def stage_parts(stage: int, num_stages: int) -> tuple[str, ...]:
    """The parts stage ``stage`` has: the first also embeds, the last also has the output layer."""
    return ((EMBED,) if stage == 0 else ()) + (BLOCKS,) + ((HEAD,) if stage == num_stages - 1 else ())


def route(num_stages: int, micro_batch: int, *, swap: bool) -> list[Hop]:
    """The hops of ``micro_batch``'s forward pass, in order (consecutive parts of one stage merged)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    order = execution_order(num_stages, micro_batch) if swap else list(range(num_stages))
    hops: list[Hop] = []
    for stage, part in [(0, EMBED)] + [(s, BLOCKS) for s in order] + [(num_stages - 1, HEAD)]:
        if hops and hops[-1][0] == stage:
            hops[-1] = (stage, hops[-1][1] + (part,))
        else:
            hops.append((stage, (part,)))
    return hops


def check_swap(num_stages: int, micro_batches: int) -> None:
    """Refuse a swapped order that would leave an edge stage's partner untrained to stand in."""
    if num_stages < 2:
        raise ValueError("swap=True needs at least 2 stages: one stage has no partner to swap with")
    need = 4 if num_stages == 3 else 2
    if micro_batches < need:
        raise ValueError(
            f"swap=True with {num_stages} stages needs at least {need} micro-batches per step "
            f"(got {micro_batches}): the odd micro-batches are the swapped ones"
            + (", and with 3 stages the two swaps alternate" if num_stages == 3 else "")
        )


def rank_of(stage: int, replica: int, num_stages: int) -> int:
    """The process rank of ``stage``'s data-parallel ``replica``: replica-major, so replica
    ``r``'s pipeline is ranks ``r * num_stages`` to ``r * num_stages + num_stages - 1``."""
    return replica * num_stages + stage


def stage_of(rank: int, num_stages: int) -> tuple[int, int]:
    """``(stage, replica)`` of process ``rank``."""
    return rank % num_stages, rank // num_stages
