"""The engine core's handle on its worker processes (`--distributed-executor-backend mp`).

The engine core is rank 0 of the process group; ranks 1..N-1 are worker processes on this machine (worker.py),
started with spawn (a fresh interpreter: no forked engine threads or OpenMP state), each with a pipe to rank 0.
Rank 0 sends each call down every pipe, then runs the same call itself; calls arrive in order, so every rank runs
the same steps and meets the others in the same collectives. A worker that dies is seen three ways: a collective
that fails, a pipe that breaks, and `problem()`, which /health reports. Workers never outlive the engine core:
shutdown stops them, and a worker whose pipe closes (rank 0 killed) exits on its own. The ranks share
torch.distributed's default process group, so a process holds one tensor-parallel engine at a time.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from localmoe.distributed.worker import STOP, init_distributed, run_worker

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # a stopped worker's time to exit before it is killed
POLL_S = 0.5  # how often a wait for a worker's reply checks that the worker lives


class WorkerDiedError(RuntimeError):
    """A worker process has exited; the engine cannot run another step."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor:
    def __init__(self, world_size: int, device: torch.device, make_runner: Callable[..., object]) -> None:
        """Start ranks 1..world_size-1, each building its runner with `make_runner(rank=r)` (on CUDA device r
        where `device`, rank 0's, is CUDA), and join the process group as rank 0. Returns without waiting for them
        to load: rank 0 loads meanwhile, then calls wait_ready."""
        if dist.is_initialized():
            raise RuntimeError("this process already runs a tensor-parallel engine (it holds torch.distributed's "
                               "default process group); shut that engine down first")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.workers: list[tuple[mp.Process, Any]] = []
        self.failure: str | None = None  # why the workers were stopped, once they were
        for rank in range(1, world_size):
            parent, child = context.Pipe()
            rank_device = torch.device("cuda", rank) if device.type == "cuda" else device
            process = context.Process(target=run_worker, name=f"localmoe-tp-rank{rank}", daemon=True,
                                      args=(rank, world_size, init_method, rank_device, make_runner, child))
            process.start()
            child.close()
            self.workers.append((process, parent))
        self._finalizer = weakref.finalize(self, _stop, self.workers)
        try:
            init_distributed(0, world_size, init_method, device)
        except Exception as error:
            self._finalizer()
            # a worker that died before joining (under spawn, often a script without a __main__ guard) says why
            raise RuntimeError(f"the tensor-parallel workers did not join: {self.problem() or error}") from error

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; raises RuntimeError with a worker's own error."""
        for rank, (process, conn) in enumerate(self.workers, start=1):
            status, error = self._receive(rank, process, conn)
            if status != "ready":
                raise RuntimeError(error)

    def call(self, method: str, *args: object, reply: bool = False) -> list[object]:
        """Run the runner's `method(*args)` on every worker (rank 0 runs it itself after this returns); with
        `reply`, wait for and return the workers' results, rank 1 first."""
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        try:
            for _, conn in self.workers:
                conn.send((method, args, reply))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerDiedError(self.problem() or f"a worker's pipe broke: {error}") from None
        if not reply:
            return []
        return [self._receive(rank, process, conn) for rank, (process, conn) in enumerate(self.workers, start=1)]

    def _receive(self, rank: int, process: mp.Process, conn: Any) -> Any:
        while not conn.poll(POLL_S):
            if not process.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} exited with code {process.exitcode}")
        try:
            return conn.recv()
        except EOFError:
            raise WorkerDiedError(f"tensor-parallel worker rank {rank} exited") from None

    def problem(self) -> str | None:
        """Why the workers cannot serve (one has exited, or they were stopped after a failed step), or None."""
        if self.failure is not None:
            return self.failure
        for rank, (process, _) in enumerate(self.workers, start=1):
            if not process.is_alive():
                return f"tensor-parallel worker rank {rank} exited with code {process.exitcode}"
        return None

    def stop(self, reason: str = "the engine shut down") -> None:
        """Stop every worker (killing those that do not exit in time) and leave the process group. Idempotent."""
        if self.failure is None:
            self.failure = reason
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(workers: list[tuple[mp.Process, Any]]) -> None:
    for process, conn in workers:
        try:
            conn.send((STOP, (), False))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # already gone
    for process, conn in workers:
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            log.warning("tensor-parallel worker %s did not stop; killing it", process.name)
            process.kill()
            process.join()
        conn.close()
