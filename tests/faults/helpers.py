"""Helpers of the fault suite: worker processes with matching settings, and queue state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh.topology import TASKS_STREAM, TopologySettings
from tests.helpers import WorkerProcess, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from nats.js.api import ConsumerInfo

    from orchestrator.core import Orchestrator

__all__ = ["CONSUMER", "consumer_info", "fault_topology", "start_worker", "topology_env"]

#: The consumer of tasks that name no model, which every echo worker serves.
CONSUMER = "chat-any"


def fault_topology(**overrides: float) -> TopologySettings:
    """Short leases and heartbeats, so faults show within seconds."""
    fields: dict[str, float] = {"ack_wait_s": 2.0, "heartbeat_interval_s": 1.0, "max_deliver": 5}
    fields.update(overrides)
    return TopologySettings(**fields)  # type: ignore[arg-type]


def topology_env(topology: TopologySettings) -> dict[str, str]:
    """The `D8_*` variables that give a worker process the same topology settings."""
    return {
        "D8_ACK_WAIT_S": str(topology.ack_wait_s),
        "D8_MAX_DELIVER": str(topology.max_deliver),
        "D8_HEARTBEAT_S": str(topology.heartbeat_interval_s),
        "D8_REPLICAS": str(topology.replicas),
    }


async def start_worker(
    orch: Orchestrator,
    url: str,
    worker_id: str,
    tmp_path: Path,
    topology: TopologySettings,
    *args: str,
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """A `d8 worker` process, returned once its heartbeat reached the orchestrator."""
    process = WorkerProcess(
        url,
        "--worker-id",
        worker_id,
        *args,
        env={**topology_env(topology), **(env or {})},
        log_path=tmp_path / f"{worker_id}.log",
    )
    try:
        await poll_until(
            lambda: worker_id in orch.workers, timeout_s=30, what=f"worker {worker_id}"
        )
    except BaseException:
        process.stop()
        raise
    return process


async def consumer_info(orch: Orchestrator, consumer: str = CONSUMER) -> ConsumerInfo:
    return await orch.js.consumer_info(TASKS_STREAM, consumer)
