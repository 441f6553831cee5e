"""Data parallelism (`--data-parallel-size N`): N independent engine replicas behind one API server.

Each replica is a whole `localmoe serve` (its engines, its OpenAI app, its drain) in a process of its own,
listening on a loopback port; the server the user talks to loads no model: it forwards each HTTP request to one
replica and relays the answer (server/dp_app.py; which replica: server/dp_router.py). Processes, not threads:
PyTorch's CPU thread pool is process-wide, so replicas in one process would share its cores and fight over them.
Each replica gets cores/N of the cores this process may use, pinned, with as many threads, and on CUDA
tensor_parallel_size GPUs of its own. Because a replica is an unchanged server, validation, streaming,
cancellation (the front closes the replica connection of a client that leaves; the replica aborts as for any
client), errors and drain behave as with one engine.

Lifetimes: replicas start (forked, or spawned on CUDA), build their engines, and report their port on a pipe; the
front serves once every replica's /health answers. Signals are the front's alone: it passes each one on down the
pipes, where a replica takes it as a lone server takes a signal (the first drains it, a second ends it), and the
front exits once every replica has. A replica never outlives the front: the pipe closing (the front gone, even
killed) drains it too. A replica that dies is not restarted: its requests end with an error, the others keep
serving, and the front's /health fails so that an orchestrator replaces the whole server.

With --enable-expert-parallel the replicas are the ranks of one expert-parallel group as well
(distributed/dp_expert_parallel.py): replica i is rank i, they meet on a port the front picks, and each holds
1/N of the routed experts. Their steps then run together, so a replica that dies fails the others' steps too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from types import FrameType

import httpx
import torch
import typer
import uvicorn

from localmoe.config import Config, ConfigError, EngineConfig
from localmoe.distributed.executor import free_port
from localmoe.engine.model_runner import resolve_device
from localmoe.server.drain import DrainingServer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # after the replicas' own drain (shutdown_timeout), for a stopped replica to exit
POLL_S = 0.5
STOP = "stop"  # the front's message to a replica, in place of a signal


class ReplicaStartError(RuntimeError):
    """A replica exited before serving; `exit_code` is its own (2: configuration, 1: model)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Placement:
    """What one replica may use: its cores (and as many threads), its GPUs where the engine runs on CUDA."""

    cpus: tuple[int, ...]
    cuda_devices: str | None  # CUDA_VISIBLE_DEVICES


def data_parallel_size(config: Config) -> int:
    """The number of replicas, the same for every model served (a replica serves them all)."""
    sizes = {engine.data_parallel_size for engine in config.engines}
    if len(sizes) > 1:
        raise ConfigError("data_parallel_size: every replica serves every model, so give one data_parallel_size "
                          f"for all of them, not {sorted(sizes)}")
    size = sizes.pop()
    if size < 1:
        raise ConfigError("data_parallel_size must be positive")
    if size > 1 and any(placement.port is not None for placement in config.placements):
        raise ConfigError("data_parallel_size: a model's own port (vllm_instances' port) is not served by replicas "
                          "yet; serve every model on the shared endpoint")
    if size > 1 and len(config.engines) > 1 and any(e.enable_expert_parallel for e in config.engines):
        raise ConfigError("enable_expert_parallel: the replicas' ranks meet in one process group, for one model; "
                          "serve one model with data_parallel_size and expert parallelism")
    if size > 1 and any(engine.routing_trace for engine in config.engines):
        raise ConfigError("routing_trace: every replica would append to the same file; trace with "
                          "data_parallel_size 1")
    return size


def placements(config: Config, size: int) -> list[Placement]:
    """Disjoint cores (and GPUs) for `size` replicas; refused where there are fewer than one each."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per_replica = len(cpus) // size
    if per_replica == 0:
        raise ConfigError(f"data_parallel_size: {size} replicas need a CPU core each; this process may use "
                          f"{len(cpus)}")
    gpus: list[str] | None = None
    if resolve_device(config.engine.device).type == "cuda":
        if config.engine.device not in ("auto", "cuda"):
            raise ConfigError("data_parallel_size: each replica takes GPUs of its own; give --device cuda (or auto), "
                              f"not {config.engine.device}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        tp = config.engine.tensor_parallel_size
        if len(devices) < size * tp:
            raise ConfigError(f"data_parallel_size: {size} replicas of tensor_parallel_size {tp} need {size * tp} "
                              f"GPUs; {len(devices)} are visible")
        gpus = [",".join(devices[i * tp:(i + 1) * tp]) for i in range(size)]
    return [Placement(tuple(cpus[i * per_replica:(i + 1) * per_replica]), gpus[i] if gpus else None)
            for i in range(size)]


def replica_config(config: Config, index: int, meeting_port: int) -> Config:
    """`config` as replica `index` serves it, on a loopback port it picks itself: one engine per model, or with
    expert parallelism rank `index` of the engines that meet on `meeting_port`."""
    def engine_of(engine: EngineConfig) -> EngineConfig:
        if engine.enable_expert_parallel:
            return replace(engine, data_parallel_rank=index, data_parallel_address="127.0.0.1",
                           data_parallel_master_port=meeting_port)
        return replace(engine, data_parallel_size=1)

    return replace(config, engine=engine_of(config.engine), models=tuple(map(engine_of, config.models)),
                   server=replace(config.server, host="127.0.0.1", port=0))


class Replica:
    def __init__(self, index: int, config: Config, placement: Placement, meeting_port: int) -> None:
        # Fork where the replica runs on CPU: the front has imported everything a replica needs and has computed
        # nothing (no PyTorch or OpenMP threads yet; OpenBLAS's pool handles fork), so a replica starts without
        # importing it all again, seconds of each core. Spawn for CUDA, unusable in a child forked after the front
        # has counted the GPUs, and off Linux.
        fork = sys.platform == "linux" and placement.cuda_devices is None
        context = mp.get_context("fork" if fork else "spawn")
        self.index = index
        self.conn, child = context.Pipe()
        # not a daemon: a replica with tensor parallelism starts worker processes of its own
        self.process = context.Process(target=run_replica, name=f"localmoe-dp-replica{index}",
                                       args=(index, replica_config(config, index, meeting_port), placement, child))
        self.process.start()
        child.close()
        self.url: str | None = None  # once it reports its port

    @property
    def alive(self) -> bool:
        return self.process.exitcode is None

    def wait_ready(self) -> None:
        """Block until the replica has built its engines and its /health answers; ReplicaStartError if it exits
        first."""
        while not self.conn.poll(POLL_S) and self.process.is_alive():
            pass
        try:
            port = self.conn.recv()
        except EOFError:
            raise self._start_failed() from None
        self.url = f"http://127.0.0.1:{port}"
        while not _healthy(self.url):
            if not self.process.is_alive():
                raise self._start_failed()
            time.sleep(0.1)
        log.info("replica %d (pid %d) serves at %s", self.index, self.process.pid, self.url)

    def _start_failed(self) -> ReplicaStartError:
        self.process.join()
        return ReplicaStartError(f"data-parallel replica {self.index} exited with {self.process.exitcode} while "
                                 "starting", self.process.exitcode or 1)

    def signal_stop(self) -> None:
        """What a signal is to a lone server: the first drains it, a second ends it at once."""
        try:
            self.conn.send(STOP)
        except OSError:  # it has exited: its end of the pipe is closed
            pass

    def stop(self, timeout: float) -> None:
        """Drain it, then kill it if it is still there after `timeout` seconds."""
        self.signal_stop()
        self.process.join(timeout)
        if self.alive:
            self.process.kill()
            self.process.join()
        self.conn.close()


def start_replicas(config: Config) -> list[Replica]:
    """Start every replica and wait until each answers /health (its engines built); a replica that fails to
    start stops the others and raises ReplicaStartError."""
    size = data_parallel_size(config)
    meeting_port = free_port()  # where the ranks of expert parallelism meet
    replicas = [Replica(i, config, placement, meeting_port) for i, placement in enumerate(placements(config, size))]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.stop(STOP_TIMEOUT_S)
        raise
    return replicas


class ReplicaServer(DrainingServer):
    """A replica's uvicorn stops when the front tells it to, never on a signal of its own: Ctrl-C reaches every
    process of the group and a service manager's SIGTERM may too, and the front passes either on, once."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        pass

    def follow(self, conn: Connection) -> None:
        """Take each STOP from the front as a lone server takes a signal, and the front's end (however it went:
        multiprocessing's sentinel of the parent process, which a forked child's copy of the pipe cannot hide) as
        one too."""
        front = mp.parent_process()
        while True:
            ready = wait([conn, front.sentinel])
            if front.sentinel in ready:
                log.warning("the API server is gone; draining")
                super().handle_exit(signal.SIGTERM, None)
                return
            conn.recv()
            super().handle_exit(signal.SIGTERM, None)


def run_replica(index: int, config: Config, placement: Placement, conn: Connection) -> None:
    """Process entry point: serve `config` on the cores (and GPUs) of `placement`; report the port on `conn`."""
    # the serve command's own path (cli imports this module, by server/dp_app.py, so not at the top)
    from localmoe.cli import GRACEFUL_CLOSE_SECONDS, configure_logging, serving_app

    if placement.cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = placement.cuda_devices  # before CUDA is first used
    os.environ["OMP_NUM_THREADS"] = str(len(placement.cpus))  # for the tensor-parallel workers it starts
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cpus)
    torch.set_num_threads(len(placement.cpus))
    if not logging.getLogger("localmoe").handlers:  # spawned: not forked from the front, which has its handler
        configure_logging(config.server.log_level, config.server.log_format)
    try:
        app = serving_app(config)
    except typer.Exit as e:  # serving_app has said why
        raise SystemExit(e.exit_code) from None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    conn.send(sock.getsockname()[1])
    settings = uvicorn.Config(app, log_level=config.server.log_level, timeout_graceful_shutdown=GRACEFUL_CLOSE_SECONDS,
                              access_log=False)  # the front logs each request
    server = ReplicaServer(settings, app.state.drain)
    threading.Thread(target=server.follow, args=(conn,), name="localmoe-dp-follow", daemon=True).start()
    server.run(sockets=[sock])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
