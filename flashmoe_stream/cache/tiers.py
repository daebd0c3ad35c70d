"""A tier: resident entries by key under a byte budget, its own eviction policy, pins, holds and reservations.

A pinned key is never evicted. A held key (a prefetch not yet asked for) is evicted only when nothing
else can go: a policy ranks a key it has never seen used below every used one, so without the hold the
reads a layer waits for would evict the next layer's prefetched experts before they are asked for.

Not thread-safe by itself: the ExpertCache calls it under its lock. Bytes in use = resident + reserved
(space promised to a copy in progress); ``used <= budget`` always holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

from .policy import Key, Policy


class _Evictable(AbstractSet):
    """The resident keys of a tier that are not pinned (what a policy may pick from), without copying;
    ``held=False``: nor held."""

    def __init__(self, tier: Tier, held: bool):
        self._tier = tier
        self._held = held

    def __contains__(self, key: object) -> bool:
        t = self._tier
        return key in t.entries and key not in t.pins and (self._held or key not in t.held)

    def __iter__(self) -> Iterator[Key]:
        t = self._tier
        return (k for k in t.entries if k not in t.pins and (self._held or k not in t.held))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Tier:
    """``entries[key] = (value, nbytes)``; ``pins[key] = count`` (a pinned key may be resident or still coming)."""

    def __init__(self, name: str, budget: int, policy: Policy,
                 on_evict: Callable[[str, Key], None] | None = None):
        self.name = name
        self.budget = int(budget)
        self.policy = policy
        self.entries: dict[Key, tuple[Any, int]] = {}
        self.pins: dict[Key, int] = {}
        self.held: set[Key] = set()  # resident keys evicted only when nothing else can go
        self.resident = 0  # bytes of the entries
        self.reserved = 0  # bytes promised to copies in progress
        self.pinned_resident = 0  # bytes of the entries that are pinned
        self.peak = 0
        self._on_evict = on_evict
        self._evictable = _Evictable(self, held=False)
        self._evictable_held = _Evictable(self, held=True)

    @property
    def used(self) -> int:
        return self.resident + self.reserved

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def value(self, key: Key) -> Any:
        return self.entries[key][0]

    def access(self, key: Key) -> None:
        self.policy.on_access(key)

    # --- pins ------------------------------------------------------------------------------

    def pin(self, key: Key) -> None:
        n = self.pins.get(key, 0)
        self.pins[key] = n + 1
        if n == 0 and key in self.entries:
            self.pinned_resident += self.entries[key][1]

    def unpin(self, key: Key) -> None:
        n = self.pins.get(key, 0) - 1
        if n > 0:
            self.pins[key] = n
        elif key in self.pins:
            del self.pins[key]
            if key in self.entries:
                self.pinned_resident -= self.entries[key][1]

    def hold(self, key: Key) -> None:
        """Keep resident ``key`` until ``unhold`` unless nothing else can make room."""
        if key in self.entries:
            self.held.add(key)

    def unhold(self, key: Key) -> None:
        self.held.discard(key)

    # --- space -----------------------------------------------------------------------------

    def make_room(self, nbytes: int) -> bool:
        """Evict (policy's choice, never a pinned key, a held one only when no other is left) until ``nbytes``
        more fit; False if they cannot."""
        if nbytes > self.budget:
            return False
        if self.used + nbytes <= self.budget:
            return True
        if self.reserved + self.pinned_resident + nbytes > self.budget:
            return False
        while self.used + nbytes > self.budget:
            free = next(iter(self._evictable), None) is not None  # held and pinned keys are few: found at once
            self.evict(self.policy.victim(self._evictable if free else self._evictable_held))
        return True

    def reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak = max(self.peak, self.used)

    def unreserve(self, nbytes: int) -> None:
        self.reserved -= nbytes

    def insert(self, key: Key, value: Any, nbytes: int) -> None:
        """Add an entry whose space was made (and usually reserved) before."""
        assert key not in self.entries, key
        self.entries[key] = (value, nbytes)
        self.resident += nbytes
        if key in self.pins:
            self.pinned_resident += nbytes
        self.peak = max(self.peak, self.used)
        assert self.used <= self.budget, (self.name, self.used, self.budget)
        self.policy.on_insert(key)

    def evict(self, key: Key) -> None:
        if key in self.pins:
            raise AssertionError(f"{self.name} tier: policy chose pinned key {key}")
        _, nb = self.entries.pop(key)
        self.held.discard(key)
        self.resident -= nb
        self.policy.on_evict(key)
        if self._on_evict is not None:
            self._on_evict(self.name, key)

    def clear(self) -> None:
        for key in list(self.entries):
            _, nb = self.entries.pop(key)
            self.resident -= nb
            self.policy.on_evict(key)
        self.pins.clear()
        self.held.clear()
        self.pinned_resident = 0
