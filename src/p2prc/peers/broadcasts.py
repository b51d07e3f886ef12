"""The updates a node piggybacks on its datagrams, each a bounded number of times.

Like memberlist's ``TransmitLimitedQueue``: one entry per key (a newer update of the same
node replaces the older one), lower priority first, then the least sent; an entry leaves
the queue once it has ridden ``limit`` datagrams. ``fresh`` says that something was queued
since the last push: the node sends it at once to a few members (``take(fresh=True)``, once
per entry, not counted against ``limit``), then spreads it as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = ["Broadcasts"]


@dataclass(slots=True)
class _Broadcast:
    key: str
    item: list[Any]
    size: int
    # Lower goes first: our own record, then claims about proven members, then records.
    priority: int = 2
    sent: int = 0
    pushed: bool = False


class Broadcasts:
    """The queue of updates waiting to ride datagrams."""

    def __init__(self) -> None:
        self._queue: dict[str, _Broadcast] = {}
        self.fresh = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str, item: list[Any], priority: int) -> None:
        size = len(msgpack.packb(item, use_bin_type=True))
        self._queue[key] = _Broadcast(key, item, size, priority)
        self.fresh = True

    def take(self, budget: int, limit: int, *, fresh: bool = False) -> list[list[Any]]:
        """The updates that fit in ``budget`` bytes; each counts one more send.

        ``fresh``: only those not pushed yet, not counted (the push's datagrams all carry
        the same ones; call :meth:`mark_pushed` after them).
        """
        chosen: list[list[Any]] = []
        for broadcast in sorted(self._queue.values(), key=lambda b: (b.priority, b.sent)):
            if broadcast.size > budget or (fresh and broadcast.pushed):
                continue
            if fresh:
                chosen.append(broadcast.item)
                budget -= broadcast.size
                continue
            chosen.append(broadcast.item)
            budget -= broadcast.size
            broadcast.sent += 1
            if broadcast.sent >= limit:
                del self._queue[broadcast.key]
        return chosen

    def mark_pushed(self) -> None:
        """Every entry queued so far has had its push."""
        for broadcast in self._queue.values():
            broadcast.pushed = True
        self.fresh = False
