"""Workers as processes on this machine (`--distributed-executor-backend mp`, the default).

Ranks 1..N-1 are started with spawn (a fresh interpreter: no forked engine threads or OpenMP state), each with a
pipe to rank 0 and rank r on CUDA device r; executor.py drives them.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable

import torch

from localmoe.distributed.executor import Executor, free_port
from localmoe.distributed.worker import run_worker


@dataclass
class ProcessWorker:
    name: str
    process: mp.Process
    conn: Connection

    def exit_reason(self) -> str | None:
        return None if self.process.is_alive() else f"exited with code {self.process.exitcode}"

    def join(self, timeout: float) -> bool:
        self.process.join(timeout)
        return not self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()


class MultiprocExecutor(Executor):
    def _start(self, world_size: int, device: torch.device, make_runner: Callable[..., object]) -> str:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        for rank in range(1, world_size):
            parent, child = context.Pipe()
            rank_device = torch.device("cuda", rank) if device.type == "cuda" else device
            process = context.Process(target=run_worker, name=f"localmoe-tp-rank{rank}", daemon=True,
                                      args=(rank, world_size, init_method, rank_device, make_runner, child))
            process.start()
            child.close()
            self.workers.append(ProcessWorker(f"tensor-parallel worker rank {rank}", process, parent))
        return init_method
