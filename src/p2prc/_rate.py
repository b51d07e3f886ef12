"""The one sliding-window rate counter: at most ``limit`` events per key in ``window`` s."""

from __future__ import annotations

from collections import deque

__all__ = ["SlidingWindow"]


class SlidingWindow:
    """Counts events per key over the last ``window`` seconds; in memory, at most ``max_keys``.

    Time is whatever clock the caller passes as ``now`` (monotonic or the table's own).
    """

    def __init__(self, limit: int, window: float, *, max_keys: int) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._events)

    def spent(self, key: str, now: float) -> bool:
        """Whether ``key`` has used up its ``limit`` in the window ending at ``now``."""
        events = self._events.get(key)
        if not events:
            return False
        while events and events[0] <= now - self.window:
            events.popleft()
        return len(events) >= self.limit

    def has_room(self, key: str, now: float) -> bool:
        """Whether ``key`` is counted already or may be (idle keys are dropped to make room)."""
        if key in self._events or len(self._events) < self.max_keys:
            return True
        horizon = now - self.window
        for idle in [
            k for k, events in self._events.items() if not events or events[-1] <= horizon
        ]:
            del self._events[idle]
        return len(self._events) < self.max_keys

    def take(self, key: str, now: float) -> bool:
        """Count one event for ``key`` if it has room and is under its limit; whether it did."""
        if not self.has_room(key, now) or self.spent(key, now):
            return False
        self._events.setdefault(key, deque()).append(now)
        return True
