"""A JetStream cluster of `nats-server` nodes on one machine, for trying and testing failover.

Each node is an `EmbeddedServer` with its own config file, store dir, client port and
route port; the ports are chosen free at construction and kept, so a killed node restarts
where it was, with its data. Streams and buckets get their replicas from
`TopologySettings.replicas` (`D8_REPLICAS=3`), and consumers inherit the stream's.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.server import EmbeddedServer

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["LocalCluster", "node_config"]


def _free_ports(count: int, host: str) -> list[int]:
    """Ports the kernel reports free now (all held open at once, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_config(
    *,
    name: str,
    cluster: str,
    host: str,
    client_port: int,
    route_port: int,
    route_ports: list[int],
    store_dir: Path,
) -> str:
    """The config file text of one clustered JetStream node."""
    routes = ", ".join(f"nats-route://{host}:{port}" for port in route_ports)
    return (
        f"server_name: {name}\n"
        f"listen: {host}:{client_port}\n"
        f"http: {host}:-1\n"
        f'jetstream {{ store_dir: "{store_dir}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
        f"cluster {{ name: {cluster}, listen: {host}:{route_port}, routes: [{routes}] }}\n"
    )


class LocalCluster:
    """`size` clustered nodes on loopback; `with LocalCluster(dir) as cluster: cluster.urls`."""

    def __init__(
        self, base_dir: Path | str, size: int = 3, *, name: str = "d8", host: str = "127.0.0.1"
    ) -> None:
        base = Path(base_dir)
        ports = _free_ports(2 * size, host)
        client_ports, route_ports = ports[:size], ports[size:]
        self.nodes: list[EmbeddedServer] = []
        for index in range(size):
            node_dir = base / f"n{index + 1}"
            node_dir.mkdir(parents=True, exist_ok=True)
            config = node_dir / "nats.conf"
            config.write_text(
                node_config(
                    name=f"n{index + 1}",
                    cluster=name,
                    host=host,
                    client_port=client_ports[index],
                    route_port=route_ports[index],
                    route_ports=route_ports,
                    store_dir=node_dir / "store",
                )
            )
            self.nodes.append(
                EmbeddedServer(node_dir, config_file=config, log_file=node_dir / "nats.log")
            )
        self.urls = [f"nats://{host}:{port}" for port in client_ports]

    def start(self) -> list[str]:
        """Start every node; JetStream answers once the nodes have elected a meta leader."""
        for node in self.nodes:
            node.start()
        return self.urls

    def node_named(self, server_name: str) -> EmbeddedServer:
        """The node whose `server_name` is `n1`, `n2`, ..."""
        return self.nodes[int(server_name.removeprefix("n")) - 1]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for node in self.nodes:
            node.__exit__(exc_type, exc, traceback)
