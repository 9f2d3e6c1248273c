"""Sticky sequences: every request of a Triton sequence goes to the worker that took its first
request (pure, bounded).

A sequence ends with ``sequence_end``; one whose end never comes (the client vanished) is
evicted least-recently-used once ``max_sequences`` are open, so client input cannot grow the
table without bound.
"""

from __future__ import annotations

import collections

from gateway.core.types import WorkerId

DEFAULT_MAX_SEQUENCES = 65536


class StickyTable:
    __slots__ = ("_map", "evicted_total", "max_sequences")

    def __init__(self, max_sequences: int = DEFAULT_MAX_SEQUENCES) -> None:
        self.max_sequences = max_sequences
        self._map: collections.OrderedDict[str, WorkerId] = collections.OrderedDict()
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"<StickyTable open={len(self._map)} evicted={self.evicted_total}>"

    def worker_for(self, sequence_id: str | None) -> WorkerId | None:
        return self._map.get(sequence_id) if sequence_id is not None else None

    def record(self, sequence_id: str, worker: WorkerId, *, end: bool) -> None:
        """The sequence's request went to ``worker``; ``end`` closes the sequence."""
        if end:
            self._map.pop(sequence_id, None)
            return
        self._map[sequence_id] = worker
        self._map.move_to_end(sequence_id)
        while len(self._map) > self.max_sequences:
            self._map.popitem(last=False)
            self.evicted_total += 1

    def forget_worker(self, worker: WorkerId) -> int:
        """Drop every sequence pinned to a worker that left the fleet; returns how many."""
        gone = [s for s, w in self._map.items() if w == worker]
        for s in gone:
            del self._map[s]
        return len(gone)
