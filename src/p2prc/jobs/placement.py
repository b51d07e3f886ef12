"""Which peers may take a job's ranks: those whose signed records fit, nearest first."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..peers.table import Member
from .task import Resources, Task

__all__ = ["Candidate", "candidates", "order_for_rank"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A peer a rank may be placed on, as the job layer names it."""

    peer: str
    name: str


def candidates(
    task: Task | Resources, members: Iterable[Member], me: str, *, include_me: bool = False
) -> tuple[list[Candidate], list[str]]:
    """Peers that fit the task (or each of its containers' ``Resources``), nearest first,
    and 'name: why' for those that do not; this node ``me`` only with ``include_me``."""
    fitting: list[tuple[float, Member]] = []
    unfit: list[str] = []
    needs = task.resources if isinstance(task, Task) else task
    memory = needs.memory_bytes
    for member in members:
        record = member.record
        if record.node_id == me and not include_me:
            continue
        why = ""
        if needs.cpus is not None and record.cores and record.cores < needs.cpus:
            why = f"{record.cores} cores < {needs.cpus:g}"
        elif memory is not None and record.memory and record.memory < memory:
            why = f"{record.memory} bytes of memory < {memory}"
        elif needs.gpus and record.gpus < needs.gpus:
            why = f"{record.gpus} GPUs < {needs.gpus}"
        if why:
            unfit.append(f"{record.name}: {why}")
            continue
        rtt = member.rtt_ms if member.rtt_ms is not None else math.inf
        fitting.append((rtt, member))
    fitting.sort(key=lambda item: (item[0], item[1].record.name))
    return [Candidate(m.record.node_id, m.record.name) for _, m in fitting], unfit


def order_for_rank(found: list[Candidate], rank: int) -> list[Candidate]:
    """The candidates in the order rank ``rank`` tries them: ranks spread over the peers."""
    if not found:
        return []
    start = rank % len(found)
    return found[start:] + found[:start]
