"""Eviction policies for one layer's expert cache: LRU, LFU, LRFU and ARC behind one interface.

A policy only tracks *which* expert ids are resident in a layer's ``capacity`` slots and which one to
give up next; it owns no memory and does no copying (``fate.runtime.experts.residency`` maps keys to slots).

The caller drives a policy like a page cache, one request at a time:

* the key is resident and gets used          → ``hit(key)``
* the key is not resident and a slot is free → ``admit(key)``
* the key is not resident and every slot is taken → ``victim = evict(key, evictable)``; if it is not
  ``None`` the victim's slot is reused and the caller then calls ``admit(key)``; if it is ``None``
  (every resident key is pinned, or ``capacity == 0``) the request is served without caching and the
  policy's state is left exactly as it was.
* a key leaves for another reason (a failed load, an explicit drop) → ``discard(key)``.

``evictable(key)`` returning False pins a key: the current or the next layer needs it, or its bytes are
still in flight.  Policies skip pinned keys and take the next candidate in their own preference order.

ARC (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003) splits the
paper's single "request x" step over ``evict`` and ``admit``; see :class:`ARCPolicy` for how.

LRFU (Lee et al., 2001) weighs each use of a key by its age: see :class:`LRFUPolicy`.  It is fate's
default (:meth:`fate.runtime.options.EngineOptions.eviction`): on the trace replay it is ahead of ARC in
every cell of a 256-token continuation (docs/BENCHMARKS.md, "eviction by decayed frequency").

The classes here are the reference.  The runtime uses their native twins (:mod:`.native_evict`,
``NativeLRUPolicy``, ``NativeLFUPolicy``, ``NativeLRFUPolicy``, ``NativeARCPolicy``, built into the copier's
extension), which make the same decisions without the OrderedDict work of the decode hot path: the same
victims, the same ``resident()`` order and, for ARC, the same ``p`` to the bit and the same lists, for LRFU
the same scores to the bit (a test drives both on
long random sequences and compares them after every step).  They differ only where these accept more:
their keys are expert ids ``0 <= key < n_keys`` (another int is a ValueError, a non-integer a TypeError;
``key in policy`` is False for them), an ``evictable`` that changes the policy it is asked for gets a
RuntimeError, and their hot methods take positional arguments only.  Both have ``evict_where(incoming,
pinned, pending, slot_of)``, the cache's own ``evict`` call (:meth:`.residency.ExpertCache.reserve`): the
native one reads the cache's containers in place, with no callable per candidate.

:func:`make_policy` picks: ``make_policy(name, capacity)`` is always the Python class;
``make_policy(name, capacity, n_keys=n)`` (the caller knows the key range: the cache does) is the native
class where the extension is built (not with ``FATE_NATIVE=0``), else the Python one.  ``native=False``
forces the Python class, ``native=True`` the native one (an error where it cannot be had): the tests
compare the two.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import Callable, Collection, Iterable, Protocol, runtime_checkable

from fate.runtime.experts import copier

Evictable = Callable[[int], bool]


def _always(_key: int) -> bool:
    return True


def _check_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"cache capacity must be a non-negative integer, got {capacity!r}")
    return capacity


def _first_evictable(keys: Iterable[int], evictable: Evictable) -> int | None:
    for k in keys:
        if evictable(k):
            return k
    return None


@runtime_checkable
class EvictionPolicy(Protocol):
    name: str  # "arc" | "lru" | "lfu" | "lrfu"
    capacity: int

    def hit(self, key: int) -> None: ...
    def admit(self, key: int) -> None: ...
    def evict(self, incoming: int, evictable: Evictable | None = None) -> int | None: ...
    def evict_where(self, incoming: int, pinned: Collection[int], pending: list[bool],
                    slot_of: list[int]) -> int | None: ...
    def discard(self, key: int) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def resident(self) -> list[int]: ...


class _Base:
    name = ""

    def __init__(self, capacity: int):
        self.capacity = _check_capacity(capacity)

    def evict_where(self, incoming: int, pinned: Collection[int], pending: list[bool],
                    slot_of: list[int]) -> int | None:
        """The cache's own call: evict, sparing the keys in ``pinned`` and those whose slot
        (``slot_of[key]``) is ``pending`` — their bytes are in flight."""
        return self.evict(incoming, lambda k: k not in pinned and not pending[slot_of[k]])  # type: ignore[attr-defined]

    def _check_admit(self, key: int) -> None:
        if key in self:  # type: ignore[operator]
            raise ValueError(f"{self.name}: expert {key} is already resident; call hit() for a use")
        if len(self) >= self.capacity:  # type: ignore[arg-type]
            raise ValueError(f"{self.name}: admit({key}) into a full cache of {self.capacity} slots; "
                             f"call evict() first and admit only if it returned a victim")

    def _check_incoming(self, key: int) -> None:
        if key in self:  # type: ignore[operator]
            raise ValueError(f"{self.name}: evict() for expert {key}, which is resident; call hit()")

    def _missing(self, key: int) -> KeyError:
        return KeyError(f"{self.name}: expert {key} is not resident")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, resident={self.resident()})"  # type: ignore[attr-defined]


class LRUPolicy(_Base):
    """Least recently used: the victim is the resident key whose last use (or admission) is oldest."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._keys: OrderedDict[int, None] = OrderedDict()  # least recent first

    def hit(self, key: int) -> None:
        if key not in self._keys:
            raise self._missing(key)
        self._keys.move_to_end(key)

    def admit(self, key: int) -> None:
        self._check_admit(key)
        self._keys[key] = None

    def evict(self, incoming: int, evictable: Evictable | None = None) -> int | None:
        self._check_incoming(incoming)
        victim = _first_evictable(self._keys, evictable or _always)
        if victim is not None:
            del self._keys[victim]
        return victim

    def discard(self, key: int) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def resident(self) -> list[int]:
        return list(self._keys)


class LFUPolicy(_Base):
    """Least frequently used, ties broken by least recent use.

    Counts are kept for resident keys only (in-cache LFU): a key that is evicted or discarded starts
    again from one when it comes back, so an expert that was hot long ago cannot squat a slot forever.
    """

    name = "lfu"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._count: OrderedDict[int, int] = OrderedDict()  # least recent first, value = uses

    def hit(self, key: int) -> None:
        if key not in self._count:
            raise self._missing(key)
        self._count[key] += 1
        self._count.move_to_end(key)

    def admit(self, key: int) -> None:
        self._check_admit(key)
        self._count[key] = 1

    def count(self, key: int) -> int:
        """Uses of a resident key since it was admitted (admission counts as one); 0 if not resident."""
        return self._count.get(key, 0)

    def evict(self, incoming: int, evictable: Evictable | None = None) -> int | None:
        self._check_incoming(incoming)
        victim = _first_evictable(self.resident(), evictable or _always)
        if victim is not None:
            del self._count[victim]
        return victim

    def discard(self, key: int) -> None:
        self._count.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def resident(self) -> list[int]:
        # sorted() is stable, so equal counts stay in recency order (least recent first).
        return sorted(self._count, key=self._count.__getitem__)


# LRFU's half-life, in requests to the layer (hits and admissions) per slot of its cache: a use counts half
# after four cache-fulls of requests.  Chosen on the trace replay of docs/BENCHMARKS.md ("eviction by
# decayed frequency"): within 0.5 % of the best half-life on each of three traces and never below ARC
# (2 and 16 slots' worth each fell below it in a cell).
LRFU_HALF_LIFE_PER_SLOT = 4


class LRFUPolicy(_Base):
    """Least recently/frequently used (LRFU: Lee et al., IEEE Trans. Computers 2001): a resident key's score
    is the sum of its uses (its admission counts as one), each weighed ``2 ** (-age / half_life)``, the age
    counted in requests to this policy (hits and admissions); the victim is the lowest score, ties by least
    recent use.  ``half_life`` is :data:`LRFU_HALF_LIFE_PER_SLOT` requests per slot.  A long ``half_life``
    is in-cache LFU, a short one LRU; in between, an expert that was popular a while ago keeps its slot
    through a few unlucky tokens (which LRU's recency would not give it), and gives it up once its uses stop
    (which LFU's count would not let it do).

    Each key keeps its score as of its last use and the request clock then; the score now is that times
    ``decay ** (clock - last)`` (the same operations, in the same order, as the native twin: the same bits).
    Every score decays by the same factor per request, so the order of two keys changes only at their own
    uses: it is the order of ``ln(score then) - last * ln(decay)`` (the log of the score now, less the log of
    the decay since the clock's start), which the native twin keeps sorted as keys are used — an eviction
    does not rescore and sort the resident keys."""

    name = "lrfu"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.half_life = float(max(1, LRFU_HALF_LIFE_PER_SLOT * self.capacity))
        self._decay = 0.5 ** (1.0 / self.half_life)
        self._ln_decay = math.log(self._decay)
        self._clock = 0
        self._score: dict[int, float] = {}  # as of the key's last use
        self._last: dict[int, int] = {}  # the clock at that use

    def score(self, key: int) -> float:
        """A resident key's score now; 0.0 if it is not resident."""
        if key not in self._score:
            return 0.0
        return self._score[key] * self._decay ** (self._clock - self._last[key])

    def hit(self, key: int) -> None:
        if key not in self._score:
            raise self._missing(key)
        self._clock += 1
        self._score[key] = self.score(key) + 1.0
        self._last[key] = self._clock

    def admit(self, key: int) -> None:
        self._check_admit(key)
        self._clock += 1
        self._score[key] = 1.0
        self._last[key] = self._clock

    def evict(self, incoming: int, evictable: Evictable | None = None) -> int | None:
        self._check_incoming(incoming)
        victim = _first_evictable(self.resident(), evictable or _always)
        if victim is not None:
            self.discard(victim)
        return victim

    def discard(self, key: int) -> None:
        self._score.pop(key, None)
        self._last.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._score

    def __len__(self) -> int:
        return len(self._score)

    def _order_key(self, key: int) -> tuple[float, int]:
        """Where ``key`` sits in the eviction order (lowest first): the log of its score now less a term every
        key shares, then its last use (unique)."""
        last = self._last[key]
        return math.log(self._score[key]) - last * self._ln_decay, last

    def resident(self) -> list[int]:
        return sorted(self._score, key=self._order_key)


class ARCPolicy(_Base):
    """Adaptive Replacement Cache (Megiddo & Modha 2003).

    State: T1 (resident, seen once recently), T2 (resident, seen at least twice), ghost lists B1 and B2
    (ids recently evicted from T1 and T2, no slot), and the target size ``p`` of T1.  Every list is kept
    least recent first.

    How the paper's step "request x" maps onto the interface:

    * Case I (x in T1 ∪ T2) is :meth:`hit`: x moves to the MRU end of T2.
    * Cases II/III (x in B1 / B2): when the cache is full the caller calls ``evict(x)`` first.  That
      call adapts ``p`` (B1 hit: ``p = min(c, p + max(|B2|/|B1|, 1))``; B2 hit:
      ``p = max(0, p - max(|B1|/|B2|, 1))``) *before* REPLACE picks the victim, exactly as in the
      paper, and remembers that x's adaptation is done; the following ``admit(x)`` then only moves x
      to the MRU end of T2.  When a slot is free (the cache is warming up, or something was discarded)
      the caller goes straight to ``admit(x)``, which adapts ``p`` itself.  An ``evict`` that returns
      ``None`` undoes its adaptation, so a refused request leaves no trace.
    * Case IV (x in no list): ``evict(x)`` runs REPLACE; ``admit(x)`` then trims the ghost lists
      (IV.A: ``|T1|+|B1| = c`` → drop the LRU of B1; IV.B: total ``= 2c`` → drop the LRU of B2) and
      puts x at the MRU end of T1.  Trimming after REPLACE instead of before it drops the same ghost:
      REPLACE only adds at the MRU ends, and in those cases the list being trimmed was not empty.  In
      IV.A with ``|T1| = c`` the paper deletes T1's LRU outright; here it passes through B1 and is the
      ghost that admit drops, which ends in the same state.

    REPLACE(x, p): evict from T1 if ``|T1| ≥ 1`` and (``|T1| > p`` or (x in B2 and ``|T1| = p``)),
    else from T2.  Pinned keys are skipped (the least recent evictable key of the chosen list goes);
    if the chosen list holds only pinned keys the other list gives the victim.  The victim moves to the
    MRU end of the matching ghost list (T1 → B1, T2 → B2).
    """

    name = "arc"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._p = 0.0
        self._adapted: int | None = None  # ghost key whose p adaptation evict() already applied

    # Read-only views, least recent first (for tests, stats and debugging).
    @property
    def p(self) -> float:
        """Target size of T1, 0 ≤ p ≤ capacity."""
        return self._p

    @property
    def t1(self) -> tuple[int, ...]:
        return tuple(self._t1)

    @property
    def t2(self) -> tuple[int, ...]:
        return tuple(self._t2)

    @property
    def b1(self) -> tuple[int, ...]:
        return tuple(self._b1)

    @property
    def b2(self) -> tuple[int, ...]:
        return tuple(self._b2)

    def hit(self, key: int) -> None:
        if key in self._t1:
            del self._t1[key]
        elif key in self._t2:
            del self._t2[key]
        else:
            raise self._missing(key)
        self._t2[key] = None

    def _adapt(self, key: int) -> None:
        c = self.capacity
        if key in self._b1:
            self._p = min(float(c), self._p + max(len(self._b2) / len(self._b1), 1.0))
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))

    def _replace_from_t1(self, incoming_in_b2: bool) -> bool:
        n1 = len(self._t1)
        return n1 >= 1 and (n1 > self._p or (incoming_in_b2 and n1 == self._p))

    def evict(self, incoming: int, evictable: Evictable | None = None) -> int | None:
        self._check_incoming(incoming)
        ok = evictable or _always
        p_before = self._p
        ghost = incoming in self._b1 or incoming in self._b2
        if ghost and self._adapted != incoming:
            self._adapt(incoming)
        lists = [(self._t1, self._b1), (self._t2, self._b2)]
        if not self._replace_from_t1(incoming in self._b2):
            lists.reverse()
        for live, ghosts in lists:
            victim = _first_evictable(live, ok)
            if victim is not None:
                del live[victim]
                ghosts[victim] = None
                self._adapted = incoming if ghost else None
                return victim
        self._p = p_before  # nothing could go: leave no trace of this request
        return None

    def admit(self, key: int) -> None:
        self._check_admit(key)
        adapted, self._adapted = self._adapted == key, None
        if key in self._b1 or key in self._b2:
            if not adapted:
                self._adapt(key)
            self._b1.pop(key, None)
            self._b2.pop(key, None)
            self._t2[key] = None
            return
        c = self.capacity
        if len(self._t1) + len(self._b1) >= c:
            # IV.A.  |T1| < c (the cache is not full), so B1 is not empty.
            self._b1.popitem(last=False)
        elif len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) >= 2 * c:
            # IV.B.  |T1|+|B1| < c here forces |T2|+|B2| > c ≥ |T2|, so B2 is not empty.
            self._b2.popitem(last=False)
        self._t1[key] = None

    def discard(self, key: int) -> None:
        for lst in (self._t1, self._t2, self._b1, self._b2):
            lst.pop(key, None)
        if self._adapted == key:
            self._adapted = None

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def resident(self) -> list[int]:
        """T1 then T2 (each least recent first) when REPLACE would take from T1 for a new key, else
        T2 then T1: the order in which keys would go if nothing else changed ``p`` meanwhile."""
        if self._replace_from_t1(False) or not self._t2:
            return list(self._t1) + list(self._t2)
        return list(self._t2) + list(self._t1)


POLICIES: dict[str, type] = {"arc": ARCPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "lrfu": LRFUPolicy}


def native_policies() -> dict[str, type] | None:
    """The native classes by name (:mod:`.native_evict`), or None where the extension is not built
    (``copier.why`` says why)."""
    mod = copier.eviction_policies()
    if mod is None:
        return None
    return {"arc": mod.NativeARCPolicy, "lru": mod.NativeLRUPolicy, "lfu": mod.NativeLFUPolicy,
            "lrfu": mod.NativeLRFUPolicy}


def make_policy(name: str, capacity: int, n_keys: int | None = None, *,
                native: bool | None = None) -> EvictionPolicy:
    """``"arc"`` | ``"lru"`` | ``"lfu"`` | ``"lrfu"`` (case-insensitive) for one layer of ``capacity`` slots.

    ``n_keys``: the keys are ``0 <= key < n_keys`` (the layer's number of experts); with it the policy is
    the native class where the extension is built, else the Python reference.  ``native``: None (that
    choice), False (always the Python class), True (always the native one: ValueError without ``n_keys``,
    RuntimeError where the extension is not built)."""
    key = name.strip().lower() if isinstance(name, str) else name
    cls = POLICIES.get(key)
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; use one of {', '.join(POLICIES)}")
    if n_keys is not None:
        try:
            n = -1 if isinstance(n_keys, bool) else operator.index(n_keys)
        except TypeError:
            n = -1
        if n < 0:
            raise ValueError(f"n_keys must be a non-negative integer, got {n_keys!r}")
        n_keys = n
    if native and n_keys is None:
        raise ValueError("a native eviction policy needs n_keys")
    if n_keys is not None and native is not False:
        classes = native_policies()
        if classes is not None:
            return classes[key](_check_capacity(capacity), n_keys)
        if native:
            raise RuntimeError(f"native eviction policies are not available: {copier.why}")
    return cls(capacity)
