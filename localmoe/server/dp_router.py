"""Which data-parallel replica serves a request: the least loaded one, unless another holds the request's prompt
prefix in its prefix cache and is not much busier.

Load is a score in units of requests: those the router has sent the replica and not yet seen answered (exact and
current, since every request passes through the router), plus those the replica itself reports waiting (they
count twice: a replica with a queue has no room), plus its KV-cache usage weighted as KV_WEIGHT requests (a
replica whose pool is nearly full is about to preempt). The replica's own numbers are polled, so they lag a
little; the router's own count does not, so a burst spreads at once.

Prefix affinity works on the request's text, before any tokenizer: the prompt (or the chat messages, or the
token ids) cut into blocks, each named by a hash chained over its parent's, as the engine names KV blocks. The
router remembers which replica it last sent each block to; a request goes to the replica of its deepest
remembered block while that replica's score is within AFFINITY_SLACK of the least loaded's. Past that the request
goes to the least loaded replica, which then owns the prefix: a prefix every request shares ends up cached on
every replica that the load pushes it to, and no replica takes more than its share for holding it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

PREFIX_BLOCK_CHARS = 64  # about 16 tokens, the engine's default block
PREFIX_BLOCK_TOKENS = 16  # for prompts given as token ids
MAX_PREFIX_BLOCKS = 64  # a prompt's first 4096 characters decide its replica
MAX_REMEMBERED_BLOCKS = 1 << 16
WAITING_WEIGHT = 1.0  # a waiting request counts this much more than a running one
KV_WEIGHT = 8.0  # a full KV pool weighs as eight requests more
AFFINITY_SLACK = 4.0  # how much busier (in requests) a replica holding the prefix may be and still get it


@dataclass
class ReplicaLoad:
    in_flight: int = 0  # sent by the router, not yet answered
    num_waiting: int = 0  # as the replica last reported
    kv_cache_usage: float = 0.0  # as the replica last reported, 0..1
    routed: int = 0  # requests sent so far (ties go to the replica that has had fewer)

    @property
    def score(self) -> float:
        return self.in_flight + WAITING_WEIGHT * self.num_waiting + KV_WEIGHT * self.kv_cache_usage


class Router:
    def __init__(self, num_replicas: int) -> None:
        self.loads = [ReplicaLoad() for _ in range(num_replicas)]
        self.owners: OrderedDict[int, int] = OrderedDict()  # prefix block hash -> the replica last sent it

    def choose(self, blocks: list[int], live: list[int]) -> tuple[int, str]:
        """The replica (one of `live`, which must not be empty) for a request whose prompt starts with `blocks`,
        and why: "prefix" or "load"."""
        least = min(live, key=lambda r: (self.loads[r].score, self.loads[r].routed))
        chosen, reason = least, "load"
        owner = next((self.owners[b] for b in reversed(blocks) if b in self.owners), None)
        if owner is not None and owner in live and self.loads[owner].score <= self.loads[least].score + AFFINITY_SLACK:
            chosen, reason = owner, "prefix"
        for block in blocks:
            self.owners[block] = chosen
            self.owners.move_to_end(block)
        while len(self.owners) > MAX_REMEMBERED_BLOCKS:
            self.owners.popitem(last=False)
        return chosen, reason

    def start(self, replica: int) -> None:
        """A request goes to `replica`: in flight there until done()."""
        self.loads[replica].in_flight += 1
        self.loads[replica].routed += 1

    def done(self, replica: int) -> None:
        self.loads[replica].in_flight -= 1

    def report(self, replica: int, num_waiting: int, kv_cache_usage: float) -> None:
        """The replica's own statistics, as last polled."""
        self.loads[replica].num_waiting = num_waiting
        self.loads[replica].kv_cache_usage = kv_cache_usage


def prefix_blocks(body: Any) -> list[int]:
    """Chained hashes of the full leading blocks of a request body's prompt: `prompt` (OpenAI completions: text,
    token ids, or a list of either, of which the first decides), `messages` (chat) or `inputs` (TGI). Empty for a
    body without one; the replica, not the router, says what is wrong with a malformed one."""
    if not isinstance(body, dict):
        return []
    prompt = body.get("prompt", body.get("inputs"))
    messages = body.get("messages")
    if isinstance(messages, list):
        prompt = "".join(f"{m.get('role')}\0{json.dumps(m.get('content'))}\0" for m in messages if isinstance(m, dict))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        size = PREFIX_BLOCK_CHARS
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        size = PREFIX_BLOCK_TOKENS
    else:
        return []
    hashes, parent = [], 0
    for start in range(0, min(len(prompt) // size, MAX_PREFIX_BLOCKS) * size, size):
        block = prompt[start:start + size]
        parent = hash((parent, block if isinstance(block, str) else tuple(block)))
        hashes.append(parent)
    return hashes
