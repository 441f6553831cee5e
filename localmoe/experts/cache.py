"""ExpertCache: a fixed budget of expert slots per MoE layer on the compute device, filled from the ExpertStore.

A step's MoE layer asks for the experts its tokens chose. Those already in a slot are hits; the others are
misses, loaded into slots freed by the eviction policy. When a step needs more experts than there are slots
(a budget below top-k, or a large batch), it runs in waves: the resident experts first (so no load evicts an
expert the step still needs), then the misses a slot-load at a time. The slots are allocated once, so the
bytes the cache holds never exceed `capacity * expert_bytes`.

Prefetch (optional, see experts/offload.py): the MoE layer before this one guesses the experts this layer will
want and has them loaded on a background thread while it computes (disk reads and copies release the GIL; on
CUDA the copies run on a side stream from pinned host memory); this layer waits for that load before it looks
at its slots.

Policies: lru evicts the least recently used expert; lfu the least often used (ties: least recent); lfru ranks by
an exponentially decayed use count, so an expert that was hot long ago fades (frequency weighted by recency).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from localmoe.config import EXPERT_CACHE_POLICIES as POLICIES
from localmoe.experts.store import ExpertStore
from localmoe.layers.huge_pages import page_aligned_zeros

LFRU_DECAY = 0.9  # per access of the layer: a use 7 steps ago weighs about half a use now


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


class ExpertCache:
    def __init__(self, path: str, store: ExpertStore, capacity: int, policy: str, device: torch.device,
                 prefetcher: ThreadPoolExecutor | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError("an expert cache needs at least one slot (expert_cache_size 0 keeps every expert resident)")
        layer = store.layers[path]
        self.path, self.store, self.policy = path, store, policy
        self.num_experts = layer.num_experts
        self.capacity = min(capacity, layer.num_experts)
        # on CPU page-aligned, so the store can read straight into a slot (direct I/O, experts/expert_file.py)
        self.slots = {kind: page_aligned_zeros((self.capacity, *shape), dtype) if device.type == "cpu"
                      else torch.zeros(self.capacity, *shape, dtype=dtype, device=device)
                      for kind, (shape, dtype) in layer.form.tensors.items()}
        self.expert_bytes = store.expert_bytes(path)
        self.slot_expert = [-1] * self.capacity  # which expert each slot holds
        self.expert_slot: dict[int, int] = {}
        self.clock = 0  # accesses of this layer so far
        self.last_use = [0] * self.num_experts
        self.uses = [0] * self.num_experts
        self.score = [0.0] * self.num_experts  # lfru: decayed use count as of last_use
        self.stats = CacheStats.zeros(self.num_experts)
        self.prefetcher = prefetcher
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and prefetcher is not None else None
        self._copied: torch.cuda.Event | None = None
        self._pending: Future | None = None
        self._prefetched: set[int] = set()

    @property
    def budget_bytes(self) -> int:
        return self.capacity * self.expert_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of expert weights the slots hold now (never above budget_bytes)."""
        return len(self.expert_slot) * self.expert_bytes

    def waves(self, expert_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """For routed expert ids [T, K], yield slot ids [T, K] wave by wave: each wave's experts are resident
        while it runs; pairs whose expert is not in the wave are -1."""
        self.wait_prefetch()
        self.clock += 1
        needed = torch.unique(expert_ids).tolist()
        wanted = set(needed)
        self.stats.prefetch_hits[list(self._prefetched & wanted)] += 1
        self._prefetched.clear()
        resident = [e for e in needed if e in self.expert_slot]
        missing = [e for e in needed if e not in self.expert_slot]
        self.stats.hits[resident] += 1
        self.stats.misses[missing] += 1
        order = resident + missing
        for start in range(0, len(order), self.capacity):
            wave = order[start:start + self.capacity]
            for expert in wave:
                if expert not in self.expert_slot:
                    self._load(expert, keep=set(wave))
                self._touch(expert)
            slot_of = torch.full((self.num_experts,), -1, dtype=torch.long)
            slot_of[wave] = torch.tensor([self.expert_slot[e] for e in wave])
            yield slot_of.to(expert_ids.device)[expert_ids]

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
        for expert in experts:
            self._load(expert, keep=set(experts))
            self._prefetched.add(expert)
        self.stats.prefetches[experts] += 1

    def _load(self, expert: int, keep: set[int]) -> None:
        """Bring `expert` into a free slot, or evict the policy's victim among experts not in `keep`."""
        if -1 in self.slot_expert:
            slot = self.slot_expert.index(-1)
        else:
            candidates = [e for e in self.expert_slot if e not in keep]
            victim = min(candidates, key=self._rank)
            slot = self.expert_slot.pop(victim)
            self.slot_expert[slot] = -1  # free until the read succeeds: a failed read leaves a free slot
        moved = self.store.read(self.path, expert, {k: s[slot] for k, s in self.slots.items()})
        self.stats.loaded_bytes[expert] += moved
        self.slot_expert[slot] = expert
        self.expert_slot[expert] = slot

    def _rank(self, expert: int) -> float | tuple[int, int]:
        """Eviction order: the smallest goes first."""
        if self.policy == "lru":
            return self.last_use[expert]
        if self.policy == "lfu":
            return self.uses[expert], self.last_use[expert]
        return self._decayed_score(expert)

    def _touch(self, expert: int) -> None:
        self.score[expert] = self._decayed_score(expert) + 1.0
        self.uses[expert] += 1
        self.last_use[expert] = self.clock

    def _decayed_score(self, expert: int) -> float:
        return self.score[expert] * LFRU_DECAY ** (self.clock - self.last_use[expert])
