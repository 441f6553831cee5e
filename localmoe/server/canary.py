"""Which version of a served name takes a request: by weight, at random, or sticky by a key the request carries.

A served name may point at several engines, its versions (a stable model and a canary, say, 90/10). A request
without a key draws a version at random in proportion to the weights. A request with a key (the X-Session-Id or
X-User header, else OpenAI's `user` field) hashes it to a point in [0, 1): the same key lands on the same version
for as long as the weights stay. The versions split [0, 1) in their order, so as the last version's weight grows
(the canary's, when it was loaded last) the keys it holds stay with it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

STICKY_HEADERS = ("x-session-id", "x-user")  # checked in this order, before the body's `user`
VERSION_HEADER = "x-localmoe-model-version"  # on every answer a version gave


def sticky_point(key: str) -> float:
    """A key's place in [0, 1), the same in every process (unlike hash())."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_version(weights: Sequence[tuple[str, float]], key: str | None, rng: random.Random) -> str:
    """The version (of `weights`' (version, weight) pairs, in order) for a request with sticky `key` or none."""
    total = sum(weight for _, weight in weights)
    if total <= 0:
        raise ValueError("the versions' weights are all 0")
    point = (sticky_point(key) if key is not None else rng.random()) * total
    for version, weight in weights:
        if point < weight:
            return version
        point -= weight
    return next(version for version, weight in reversed(weights) if weight > 0)  # rounding at the very top


def sticky_key(headers: Mapping[str, str], user: str | None) -> str | None:
    """What makes a request's choice sticky: a header, else the body's `user`."""
    for name in STICKY_HEADERS:
        if headers.get(name):
            return headers[name]
    return user or None
