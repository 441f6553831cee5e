"""A worker: one rank > 0 of a tensor-parallel engine, in a process of its own (mp_executor.py) or a Ray actor
(ray_executor.py).

It joins the process group, builds its own ModelRunner (which loads the model and keeps this rank's shard of it
and of the KV cache), reports ready, then runs whatever the engine core (rank 0) calls, in the order called:
each step rank 0 sends the step's inputs down the connection and every rank runs the same forward pass, meeting in
its collectives. A worker has nothing to recover into: any error ends it, which rank 0 sees as a dead worker (a
collective or the connection fails, /health reports it). The connection closing (the engine core gone) ends it too.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a collective waits for the other ranks: they run the same step, so a long wait means one is stuck
# (a rank that died fails the collective at once). Loading happens before any collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=2)

STOP = "stop"  # the call that ends a worker's loop


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the default process group: NCCL between CUDA devices, gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def run_worker(rank: int, world_size: int, init_method: str, device: torch.device,
               make_runner: Callable[..., object], conn: Connection) -> None:
    """Entry point: `make_runner(rank=rank, device=device)` builds this rank's runner; each call that arrives is
    (method, args, reply): the runner's method applied to args, its result sent back when `reply`."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the engine core drains its requests and then stops the workers
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        init_distributed(rank, world_size, init_method, device)
        runner = make_runner(rank=rank, device=device)
    except Exception as error:  # noqa: BLE001 -- rank 0 raises it as the engine's start failure
        conn.send(("failed", f"rank {rank}: {error}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            method, args, reply = conn.recv()
            if method == STOP:
                break
            result = getattr(runner, method)(*args)
            if reply:
                conn.send(result)
    except EOFError:  # the engine core is gone
        pass
    except Exception:
        log.exception("rank %d failed; the worker exits", rank)
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()
