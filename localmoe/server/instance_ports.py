"""The original project's vllm_instances, each on a port of its own: `port: 8001` serves that instance there too.

The original ran one vLLM server per instance; here every instance is served on the shared endpoint and, where it
names a port, on that port as well, by the same app and the same uvicorn server (one more listening socket): one
lifespan, one drain, one /metrics. A request that arrives on an instance's port is pinned to that instance's
model: naming no model means it, naming another is a 404, and /v1/models lists it alone, as the original's
separate server would have answered.
"""

from __future__ import annotations

import socket
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.config import Config, ConfigError

# the served name a request is pinned to by the port it arrived on; None on the shared port
PINNED_MODEL: ContextVar[str | None] = ContextVar("localmoe_pinned_model", default=None)


def instance_ports(config: Config) -> dict[int, str]:
    """Each instance port and the served name it serves; a port given to two names, or the shared one, is refused."""
    ports: dict[int, str] = {}
    for own in config.served():
        port, name = own.placement.port, own.engine.served_model_name or own.engine.model_name
        if port is None:
            continue
        if port == config.server.port:
            raise ConfigError(f"port {port} of {name!r} is the server's own --port; give the instance another")
        if ports.setdefault(port, name) != name:
            raise ConfigError(f"port {port} is given to both {ports[port]!r} and {name!r}")
    return ports


def listening_sockets(config: Config, ports: dict[int, str]) -> list[socket.socket]:
    """The shared endpoint's socket and one per instance port, bound and listening on --host."""
    sockets = []
    try:
        for port in (config.server.port, *ports):
            family = socket.AF_INET6 if ":" in config.server.host else socket.AF_INET
            sockets.append(socket.create_server((config.server.host, port), family=family, backlog=2048))
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {config.server.host}:{port}: {e.strerror}") from None
    return sockets


class PinnedPortMiddleware:
    """Pins each request arriving on an instance port to that instance's model (PINNED_MODEL)."""

    def __init__(self, app: ASGIApp, ports: dict[int, str]) -> None:
        self.app = app
        self.ports = ports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        name = self.ports.get(server[1]) if scope["type"] == "http" and server else None
        if name is None:
            await self.app(scope, receive, send)
            return
        token = PINNED_MODEL.set(name)
        try:
            await self.app(scope, receive, send)
        finally:
            PINNED_MODEL.reset(token)
