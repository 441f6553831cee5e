"""ExpertCache: expert slots on the compute device, filled from the ExpertStore, for one MoE layer.

A step's MoE layer asks for the experts its tokens chose. Those already in a slot are hits; the others are
misses, loaded into slots freed by the eviction policy. When a step needs more experts than there are slots
(a budget below top-k, or a large batch), it runs in waves: the resident experts first (so no load evicts an
expert the step still needs), then the misses a slot-load at a time. The slots are allocated once, so the
bytes the cache holds never exceed its budget.

The slots belong to a SlotPool. Usually each layer has a pool of its own (`expert_cache_size` slots, or its share
of `expert_cache_memory`); where the bytes give less than one expert per layer, all layers share one pool, and a
layer's miss may evict another layer's expert. Loads into a pool are serialized and the slots a running wave reads
are pinned, so a prefetch for the next layer never overwrites them.

Prefetch (optional, see experts/offload.py): the MoE layer before this one guesses the experts this layer will
want and has them loaded on a background thread while it computes (disk reads and copies release the GIL; on
CUDA the copies run on a side stream from pinned host memory); this layer waits for that load before it looks
at its slots.

Policies: lru evicts the least recently used expert; lfu the least often used (ties: least recent); lfru ranks by
an exponentially decayed use count, so an expert that was hot long ago fades (frequency weighted by recency).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from localmoe.config import EXPERT_CACHE_POLICIES as POLICIES
from localmoe.experts.store import ExpertStore
from localmoe.layers.huge_pages import page_aligned_zeros

LFRU_DECAY = 0.9  # per access of the pool: a use 7 accesses ago weighs about half a use now

Key = tuple[str, int]  # (MoE layer path, expert)


@dataclass
class CacheStats:
    """Per expert [E]: counts since the cache was made."""

    hits: torch.Tensor  # steps that wanted the expert and found it resident
    misses: torch.Tensor  # steps that had to load it
    loaded_bytes: torch.Tensor  # bytes moved into a slot for it (misses and prefetches)
    prefetches: torch.Tensor  # times prefetch loaded it ahead
    prefetch_hits: torch.Tensor  # of those, times the step that followed wanted it

    @classmethod
    def zeros(cls, num_experts: int) -> "CacheStats":
        return cls(*(torch.zeros(num_experts, dtype=torch.long) for _ in range(5)))

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 0.0

    @property
    def bytes_loaded(self) -> int:
        return int(self.loaded_bytes.sum())

    @property
    def prefetched(self) -> int:
        return int(self.prefetches.sum())

    @property
    def prefetch_used(self) -> int:
        return int(self.prefetch_hits.sum())


class SlotPool:
    """`capacity` slots of one expert form ("w13"/"w2" or the quantized tiles -> shape and dtype of one expert's
    tensor), which experts of one or more layers occupy, and the eviction policy's state over them."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], capacity: int, policy: str,
                 device: torch.device) -> None:
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError("an expert cache needs at least one slot (expert_cache_size 0 keeps every expert resident)")
        self.capacity, self.policy = capacity, policy
        # on CPU page-aligned, so the store can read straight into a slot (direct I/O, experts/expert_file.py)
        self.slots = {kind: page_aligned_zeros((capacity, *shape), dtype) if device.type == "cpu"
                      else torch.zeros(capacity, *shape, dtype=dtype, device=device)
                      for kind, (shape, dtype) in tensors.items()}
        self.layers: list[str] = []  # the layers whose caches use these slots
        self.owner: list[Key | None] = [None] * capacity  # which expert each slot holds
        self.slot_of: dict[Key, int] = {}
        self.pinned: set[int] = set()  # slots a running wave reads
        self.lock = threading.Lock()  # loads (misses and the prefetch thread's) one at a time
        self.clock = 0  # accesses of the pool's layers so far
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}
        self.score: dict[Key, float] = {}  # lfru: decayed use count as of last_use

    @property
    def nbytes(self) -> int:
        return sum(slots.numel() * slots.element_size() for slots in self.slots.values())

    def free_slot(self, keep: set[Key], layer: str) -> int | None:
        """An empty slot, or the slot of the victim among experts not in `keep` and not pinned (now empty); None
        where every slot is pinned or kept. Called with the lock held, by `layer` (loading into it).

        Layers run in order, step after step, so of the layers sharing the pool the one needed again last is the
        one just run, then the one before it: the victim comes from the layer whose next run is furthest from
        `layer`'s (its own other experts count as a whole cycle away), and within that layer by the policy. With
        least-recently-used across layers, a pool smaller than a step's experts would evict each expert just
        before its layer runs again (a hit rate of zero)."""
        if None in self.owner:
            return self.owner.index(None)
        candidates = [key for key, slot in self.slot_of.items() if key not in keep and slot not in self.pinned]
        if not candidates:
            return None
        order = {path: index for index, path in enumerate(self.layers)}

        def next_run(key: Key) -> int:  # runs of the pool's layers until key's layer runs again
            return (order[key[0]] - order[layer]) % len(self.layers) or len(self.layers)
        furthest = max(map(next_run, candidates))
        victim = min((key for key in candidates if next_run(key) == furthest), key=self._rank)
        slot = self.slot_of.pop(victim)
        self.owner[slot] = None  # free until the read succeeds: a failed read leaves a free slot
        return slot

    def touch(self, key: Key) -> None:
        self.score[key] = self._decayed_score(key) + 1.0
        self.uses[key] = self.uses.get(key, 0) + 1
        self.last_use[key] = self.clock

    def _rank(self, key: Key) -> float | tuple[int, int]:
        """Eviction order: the smallest goes first."""
        if self.policy == "lru":
            return self.last_use.get(key, 0)
        if self.policy == "lfu":
            return self.uses.get(key, 0), self.last_use.get(key, 0)
        return self._decayed_score(key)

    def _decayed_score(self, key: Key) -> float:
        return self.score.get(key, 0.0) * LFRU_DECAY ** (self.clock - self.last_use.get(key, 0))


class ExpertCache:
    def __init__(self, path: str, store: ExpertStore, capacity: int, policy: str, device: torch.device,
                 prefetcher: ThreadPoolExecutor | None = None, pool: SlotPool | None = None) -> None:
        """A cache for layer `path` over `pool`, or over a pool of its own of `capacity` slots."""
        layer = store.layers[path]
        self.path, self.store = path, store
        self.num_experts = layer.num_experts
        self.pool = pool or SlotPool(layer.form.tensors, min(capacity, layer.num_experts), policy, device)
        self.pool.layers.append(path)
        self.policy, self.capacity, self.slots = self.pool.policy, self.pool.capacity, self.pool.slots
        self.expert_bytes = store.expert_bytes(path)
        self.clock = 0  # accesses of this layer so far
        self.stats = CacheStats.zeros(self.num_experts)
        self.prefetcher = prefetcher
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and prefetcher is not None else None
        self._copied: torch.cuda.Event | None = None
        self._pending: Future | None = None
        self._prefetched: set[int] = set()

    @property
    def expert_slot(self) -> dict[int, int]:
        """This layer's resident experts and their slots."""
        with self.pool.lock:  # the prefetch thread may be loading into a shared pool
            return {expert: slot for (path, expert), slot in self.pool.slot_of.items() if path == self.path}

    @property
    def slot_expert(self) -> list[int]:
        """Per slot, the expert of this layer it holds, or -1."""
        with self.pool.lock:
            return [key[1] if key is not None and key[0] == self.path else -1 for key in self.pool.owner]

    @property
    def budget_bytes(self) -> int:
        return self.capacity * self.expert_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of this layer's expert weights the slots hold now (never above budget_bytes)."""
        return len(self.expert_slot) * self.expert_bytes

    def waves(self, expert_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """For routed expert ids [T, K], yield slot ids [T, K] wave by wave: each wave's experts are resident
        (and pinned) while it runs; pairs whose expert is not in the wave are -1, as are pairs routed to id -1 (an
        expert another rank holds, under expert parallelism)."""
        self.wait_prefetch()
        pool = self.pool
        self.clock += 1
        pool.clock += 1
        needed = [e for e in torch.unique(expert_ids).tolist() if e >= 0]
        wanted = set(needed)
        self.stats.prefetch_hits[list(self._prefetched & wanted)] += 1
        self._prefetched.clear()
        held = self.expert_slot
        resident = [e for e in needed if e in held]
        missing = [e for e in needed if e not in held]
        self.stats.hits[resident] += 1
        self.stats.misses[missing] += 1
        order = resident + missing
        for start in range(0, len(order), self.capacity):
            wave = order[start:start + self.capacity]
            slots = []
            try:
                for expert in wave:
                    slots.append(self._load(expert, {(self.path, e) for e in wave}, pin=True))
                    pool.touch((self.path, expert))
                slot_of = torch.full((self.num_experts + 1,), -1, dtype=torch.long)  # index 0: id -1
                slot_of[torch.tensor(wave) + 1] = torch.tensor(slots)
                yield slot_of.to(expert_ids.device)[expert_ids + 1]
            finally:
                pool.pinned.difference_update(slots)

    def prefetch(self, experts: list[int]) -> None:
        """Load these experts ahead of this layer's next step (in the background when there is a prefetcher)."""
        wanted = [e for e in experts if e not in self.expert_slot][: self.capacity]
        if not wanted:
            return
        self.wait_prefetch()
        # on CUDA the copies go on a side stream, after whatever queued work may still read the slots they fill
        after = torch.cuda.current_stream(self.device) if self.copy_stream is not None else None
        if self.prefetcher is None:
            self._prefetch(wanted, after)
        else:
            self._pending = self.prefetcher.submit(self._prefetch, wanted, after)

    def wait_prefetch(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        if self._copied is not None:  # compute on the slots only once the side stream's copies are done
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._copied = None

    def _prefetch(self, experts: list[int], after: "torch.cuda.Stream | None") -> None:
        if self.copy_stream is None:
            self._load_all(experts)
            return
        self.copy_stream.wait_stream(after)
        with torch.cuda.stream(self.copy_stream):
            self._load_all(experts)
            self._copied = torch.cuda.Event()
            self._copied.record(self.copy_stream)

    def _load_all(self, experts: list[int]) -> None:
        keep = {(self.path, e) for e in experts}
        loaded = []
        for expert in experts:
            if self._load(expert, keep, pin=False) is None:
                break  # a shared pool whose other slots a running wave reads: the rest stays a miss
            loaded.append(expert)
            self._prefetched.add(expert)
        self.stats.prefetches[loaded] += 1

    def _load(self, expert: int, keep: set[Key], pin: bool) -> int | None:
        """The slot of `expert`, read into a free slot or the policy's victim's (not one in `keep`, nor pinned)
        if not resident; pinned where asked. None where no slot can be freed (only prefetch can meet that:
        a wave is never larger than the pool)."""
        pool, key = self.pool, (self.path, expert)
        with pool.lock:
            slot = pool.slot_of.get(key)
            if slot is None:
                slot = pool.free_slot(keep, self.path)
                if slot is None:
                    return None
                moved = self.store.read(self.path, expert, {k: s[slot] for k, s in pool.slots.items()})
                self.stats.loaded_bytes[expert] += moved
                pool.owner[slot] = key
                pool.slot_of[key] = slot
            if pin:
                pool.pinned.add(slot)
            return slot
