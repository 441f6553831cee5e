"""Workers as Ray actors, on one machine or several (`--distributed-executor-backend ray`; vLLM's, SGLang's and Ray
Serve LLM's way of placing ranks on a cluster).

The engine core joins the Ray cluster that RAY_ADDRESS or a running local cluster names, or starts a local one,
and reserves a placement group of one bundle per rank: bundle 0, on the engine core's own node, holds rank 0's
CPUs (and GPU), so Ray places nothing else on them; bundle r holds rank r's actor, wherever the cluster has room.
Each actor opens a listening socket on its node's IP (the address Ray reports, reachable from the other nodes),
rank 0 connects to it with a random key, and from then on executor.py drives the actor like a local process:
the actor's `serve` runs the worker loop (worker.py) until the engine core stops it. The process group meets at
rank 0's node IP. `serve` finishing (the loop ended, or the actor or its node died: Ray fails the call) is how a
dead worker is seen; stopping kills the actors and removes the placement group. The engine core stays connected to
the cluster until it exits (Ray's own exit hook disconnects it, and stops a local cluster it started): Ray's
shutdown resets the process's SIGTERM handler, which the server's graceful stop needs.

The checkpoint must be at the same path on every node, and localmoe installed there, as with vLLM.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from localmoe.distributed.executor import Executor, free_port
from localmoe.distributed.worker import run_worker

log = logging.getLogger(__name__)

# Only against a hang: a cluster whose room for the bundles is taken never readies them; a new actor starts an
# interpreter and imports torch, which on a busy node takes a while
PLACEMENT_TIMEOUT_S = 120.0
ACTOR_START_TIMEOUT_S = 300.0
NODE_ID_LABEL = "ray.io/node-id"


class RankActor:
    """One rank > 0 inside a Ray actor (Ray's process title: ray::RankActor)."""

    def listen(self, authkey: bytes) -> tuple[tuple[str, int], str]:
        """Open the socket rank 0 connects to; returns its address and this node's id."""
        self.listener = Listener((ray.util.get_node_ip_address(), 0), authkey=authkey)
        return self.listener.address, ray.get_runtime_context().get_node_id()

    def serve(self, rank: int, world_size: int, init_method: str, device: torch.device,
              make_runner: Callable[..., object]) -> None:
        """Accept rank 0's connection, then run the worker loop until it ends."""
        with self.listener, self.listener.accept() as conn:
            run_worker(rank, world_size, init_method, device, make_runner, conn)


@dataclass
class RayWorker:
    name: str
    actor: Any  # ray.actor.ActorHandle
    serving: ray.ObjectRef  # RankActor.serve's result: ready once the worker has ended
    conn: Connection

    def exit_reason(self) -> str | None:
        if not ray.wait([self.serving], timeout=0)[0]:
            return None
        try:
            ray.get(self.serving)
        except ray.exceptions.RayError as error:
            return f"died: {type(error).__name__}: {str(error).splitlines()[0]}"
        return "exited"

    def join(self, timeout: float) -> bool:
        return bool(ray.wait([self.serving], timeout=timeout)[0])

    def kill(self) -> None:
        ray.kill(self.actor)


def _bundle(cpus: int, device: torch.device) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": 1} if device.type == "cuda" else {})}


class RayExecutor(Executor):
    def __init__(self, world_size: int, device: torch.device, make_runner: Callable[..., object],
                 cpus_per_worker: int = 1) -> None:
        self.cpus_per_worker = cpus_per_worker
        super().__init__(world_size, device, make_runner)

    def _start(self, world_size: int, device: torch.device, make_runner: Callable[..., object]) -> str:
        if not ray.is_initialized():
            # RAY_ADDRESS, else the local cluster `ray start` left running, else a new local one
            ray.init()
        bundle = _bundle(self.cpus_per_worker, device)
        needed = {key: amount * world_size for key, amount in bundle.items()}
        if any(ray.cluster_resources().get(key, 0) < amount for key, amount in needed.items()):
            raise RuntimeError(f"tensor_parallel_size {world_size} needs {needed} of the Ray cluster, which has "
                               f"{ray.cluster_resources()}; add nodes or lower tensor_parallel_size / "
                               "ray_cpus_per_worker")
        group = placement_group([bundle] * world_size, strategy="PACK", bundle_label_selector=[
            {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}, *[{}] * (world_size - 1)])
        self.releases.append(partial(remove_placement_group, group))
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the Ray cluster has had no room for {world_size} bundles of {bundle}, the first on "
                               f"this node, for {PLACEMENT_TIMEOUT_S:.0f} s (free: {ray.available_resources()})"
                               ) from None
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        self._start_actors(group, world_size, init_method, device, make_runner)
        return init_method

    def _start_actors(self, group: PlacementGroup, world_size: int, init_method: str, device: torch.device,
                      make_runner: Callable[..., object]) -> None:
        authkey = os.urandom(32)
        actor_class = ray.remote(RankActor)
        gpus = 1 if device.type == "cuda" else 0
        actors = [actor_class.options(
            num_cpus=self.cpus_per_worker, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote() for rank in range(1, world_size)]
        # a worker's own GPU is the one Ray made visible to it
        rank_device = torch.device("cuda", 0) if gpus else device
        opened = ray.get([actor.listen.remote(authkey) for actor in actors], timeout=ACTOR_START_TIMEOUT_S)
        for rank, (actor, (address, node)) in enumerate(zip(actors, opened), start=1):
            serving = actor.serve.remote(rank, world_size, init_method, rank_device, make_runner)
            conn = Client(address, authkey=authkey)
            self.workers.append(RayWorker(f"tensor-parallel worker rank {rank} (Ray node {node})", actor, serving,
                                          conn))
            log.info("tensor-parallel rank %d runs on Ray node %s (%s)", rank, node, address[0])
