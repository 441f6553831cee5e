"""The engine core's handle on the other ranks of a tensor-parallel engine, whatever started them: processes on
this machine (mp_executor.py) or Ray actors on a cluster (ray_executor.py).

The engine core is rank 0 of the process group; ranks 1..N-1 are workers (worker.py), each holding a connection
to rank 0 (a pipe, or a socket across machines). Rank 0 sends each call down every connection, then runs the same
call itself; calls arrive in order, so every rank runs the same steps and meets the others in the same
collectives. A worker that dies is seen three ways: a collective that fails, a connection that breaks, and
`problem()`, which /health reports. Workers never outlive the engine core: shutdown stops them, and a worker whose
connection closes (rank 0 gone) exits on its own. The ranks share torch.distributed's default process group, so a
process holds one tensor-parallel engine at a time.
"""

from __future__ import annotations

import logging
import socket
import weakref
from multiprocessing.connection import Connection
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from localmoe.distributed.worker import STOP, init_distributed

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # a stopped worker's time to exit before it is killed
POLL_S = 0.5  # how often a wait for a worker's reply checks that the worker lives


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for the process group to meet at."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WorkerDiedError(RuntimeError):
    """A worker has exited; the engine cannot run another step."""


class Worker(Protocol):
    """One rank > 0 as its backend started it."""

    name: str
    conn: Connection

    def exit_reason(self) -> str | None:
        """How the worker ended ("exited with code 1"), or None while it lives."""

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker to end; whether it did."""

    def kill(self) -> None:
        """End the worker now."""


class Executor:
    """Rank 0's side of the ranks. A backend's `_start` starts ranks 1..world_size-1 (appending them to
    `self.workers`, and what to free after them to `self.releases`) and returns the process group's init method;
    rank 0 then joins the group, so construction returns once every worker has joined, while they load."""

    def __init__(self, world_size: int, device: torch.device, make_runner: Callable[..., object]) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already runs a tensor-parallel engine (it holds torch.distributed's "
                               "default process group); shut that engine down first")
        self.workers: list[Worker] = []
        self.releases: list[Callable[[], None]] = []  # run in order once the workers have stopped
        self.failure: str | None = None  # why the workers were stopped, once they were
        self._finalizer = weakref.finalize(self, _stop, self.workers, self.releases)
        try:
            init_method = self._start(world_size, device, make_runner)
            init_distributed(0, world_size, init_method, device)
        except Exception as error:
            self._finalizer()
            # a worker that died before joining says why
            raise RuntimeError(f"the tensor-parallel workers did not join: {self.problem() or error}") from error

    def _start(self, world_size: int, device: torch.device, make_runner: Callable[..., object]) -> str:
        raise NotImplementedError

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; raises RuntimeError with a worker's own error."""
        for worker in self.workers:
            status, error = self._receive(worker)
            if status != "ready":
                raise RuntimeError(error)

    def call(self, method: str, *args: object, reply: bool = False) -> list[object]:
        """Run the runner's `method(*args)` on every worker (rank 0 runs it itself after this returns); with
        `reply`, wait for and return the workers' results, rank 1 first."""
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        try:
            for worker in self.workers:
                worker.conn.send((method, args, reply))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerDiedError(self.problem() or f"a worker's connection broke: {error}") from None
        return [self._receive(worker) for worker in self.workers] if reply else []

    def _receive(self, worker: Worker) -> object:
        while not worker.conn.poll(POLL_S):
            if (reason := worker.exit_reason()) is not None:
                raise WorkerDiedError(f"{worker.name} {reason}")
        try:
            return worker.conn.recv()
        except (EOFError, ConnectionResetError):
            raise WorkerDiedError(f"{worker.name} exited") from None

    def problem(self) -> str | None:
        """Why the workers cannot serve (one has ended, or they were stopped after a failed step), or None."""
        if self.failure is not None:
            return self.failure
        for worker in self.workers:
            if (reason := worker.exit_reason()) is not None:
                return f"{worker.name} {reason}"
        return None

    def stop(self, reason: str = "the engine shut down") -> None:
        """Stop every worker (killing those that do not exit in time) and leave the process group. Idempotent."""
        if self.failure is None:
            self.failure = reason
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(workers: list[Worker], releases: list[Callable[[], None]]) -> None:
    for worker in workers:
        try:
            worker.conn.send((STOP, (), False))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # already gone
    for worker in workers:
        if not worker.join(STOP_TIMEOUT_S):
            log.warning("%s did not stop; killing it", worker.name)
            worker.kill()
        worker.conn.close()
    for release in releases:
        release()
