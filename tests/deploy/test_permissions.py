"""The per-role permissions of deploy/nats/permissions.conf, on a real server.

Each role works end to end with exactly its rights, and each right it should not have is
refused: the server answers a denied publish or subscription with a permissions violation
(nats-py reports it through `error_cb`; the request itself would only time out).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import nats
import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from mesh.connection import ConnectionSettings
from mesh.contract import Task, decode_heartbeat
from mesh.errors import ConfigError
from mesh.health import check_heartbeat
from mesh.server import EmbeddedServer
from mesh.topology import (
    TASKS_STREAM,
    WORKERS_BUCKET,
    Capability,
    TopologySettings,
    declare_capability,
)
from orchestrator.core import Orchestrator, OrchestratorSettings
from orchestrator.status import StatusCollector
from tests.deploy.nats_configs import ADMIN, PASSWORDS, render_hub
from tests.helpers import poll_until, running_worker, worker_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from nats.aio.client import Client as NATS

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOPOLOGY = TopologySettings(heartbeat_interval_s=1.0)
INBOX = {"orchestrator": "_INBOX_orchestrator", "worker": "_INBOX_worker", "client": "_INBOX"}


def role_connection(url: str, role: str) -> ConnectionSettings:
    """How compose connects each role: its user, password and inbox prefix."""
    return ConnectionSettings(
        servers=(url,),
        name=f"test-{role}",
        user=role,
        password=PASSWORDS[f"D8_{role.upper()}_PASSWORD"],
        inbox_prefix=INBOX[role],
    )


def _start_hub(directory: Path) -> EmbeddedServer:
    config = render_hub(directory, admin=True)
    server = EmbeddedServer(directory, config_file=config, log_file=directory / "nats.log")
    server.start()
    return server


async def _declare(url: str) -> None:
    # The orchestrator declares everything with its own (narrow) rights; a test-only admin
    # adds a bucket that is none of the mesh's business, to be kept out of.
    async with Orchestrator(
        OrchestratorSettings(connection=role_connection(url, "orchestrator"), topology=TOPOLOGY)
    ) as orchestrator:
        await declare_capability(
            orchestrator.js, Capability.for_model("echo"), TOPOLOGY, update=True
        )
    admin = await nats.connect(url, **ADMIN)
    try:
        kv = await admin.jetstream().create_key_value(KeyValueConfig(bucket="secrets"))
        await kv.put("token", b"not for workers")
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One hub for the refusal table, declared by the orchestrator role."""
    directory = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in PASSWORDS.items():
            patch.setenv(name, value)
        patch.setenv("D8_NATS_STORE_DIR", str(directory / "jetstream"))
        server = _start_hub(directory)
    try:
        anyio.run(_declare, server.url)
        yield server
    finally:
        server.stop()


async def _connect(url: str, role: str, errors: list[str]) -> NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    options: dict[str, Any] = role_connection(url, role).options()
    return await nats.connect(**options, error_cb=on_error)


# (role, "pub" or "sub", subject, what it would let the role do)
REFUSED = [
    ("worker", "pub", "tasks.chat.any", "inject a task"),
    ("worker", "pub", "$JS.API.STREAM.CREATE.TASKS", "create the task stream"),
    ("worker", "pub", "$JS.API.STREAM.PURGE.TASKS", "purge the queue"),
    ("worker", "pub", "$JS.API.CONSUMER.DURABLE.CREATE.TASKS.chat-x", "create a consumer"),
    ("worker", "pub", "$JS.API.STREAM.INFO.KV_secrets", "look at another bucket"),
    ("worker", "pub", "$JS.API.DIRECT.GET.KV_secrets.$KV.secrets.token", "read another bucket"),
    ("worker", "pub", "$KV.secrets.token", "write another bucket"),
    ("worker", "pub", "$JS.API.CONSUMER.CREATE.KV_results", "watch every result"),
    ("worker", "pub", "$JS.API.STREAM.MSG.GET.DEAD", "read dead letters"),
    ("worker", "sub", "tasks.>", "listen to tasks"),
    ("worker", "sub", "results.*", "listen to every result"),
    ("worker", "sub", "_INBOX.>", "read clients' replies"),
    ("client", "pub", "$JS.API.CONSUMER.MSG.NEXT.TASKS.chat-any", "consume tasks"),
    ("client", "pub", "$JS.API.CONSUMER.DURABLE.CREATE.TASKS.mine", "make a task consumer"),
    ("client", "pub", "$JS.API.CONSUMER.CREATE.TASKS.mine.tasks.chat.any", "make one (new API)"),
    ("client", "pub", "$JS.ACK.TASKS.chat-any.1.1.1.0.0", "ack someone's task"),
    ("client", "pub", "$KV.results.forged", "forge a result"),
    ("client", "pub", "$KV.workers.fake", "pose as a worker"),
    ("client", "pub", "$JS.API.STREAM.DELETE.TASKS", "delete the queue"),
    ("client", "sub", "tasks.>", "listen to tasks"),
    ("orchestrator", "pub", "$JS.API.STREAM.CREATE.OTHER", "create a foreign stream"),
    ("orchestrator", "pub", "$JS.API.STREAM.INFO.KV_secrets", "look at a foreign bucket"),
    ("orchestrator", "pub", "$JS.API.STREAM.PURGE.KV_secrets", "purge a foreign bucket"),
]


@pytest.mark.parametrize(
    ("role", "kind", "subject"),
    [case[:3] for case in REFUSED],
    ids=[f"{case[0]} may not {case[3]}" for case in REFUSED],
)
async def test_role_is_refused(hub: EmbeddedServer, role: str, kind: str, subject: str) -> None:
    errors: list[str] = []
    nc = await _connect(hub.url, role, errors)
    try:
        if kind == "pub":
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
        else:
            await nc.subscribe(subject)
        await nc.flush(timeout=5)
        violation = await poll_until(
            lambda: [e for e in errors if "permissions violation" in e], what="a violation"
        )
    finally:
        await nc.close()
    # nats-py lowercases the server's message.
    assert subject.lower() in violation[0]


# The JetStream API calls of the read-only `nats` lines in the docs, which the client
# login must be allowed: (subject, request body, a key of the JSON answer).
CLIENT_CLI_CALLS = [
    ("$JS.API.STREAM.INFO.TASKS", b"", "state"),  # nats stream info TASKS
    ("$JS.API.CONSUMER.NAMES.TASKS", b"{}", "consumers"),  # nats consumer ls TASKS
    ("$JS.API.CONSUMER.LIST.TASKS", b"{}", "consumers"),
    ("$JS.API.CONSUMER.INFO.TASKS.chat-any", b"", "num_pending"),  # nats consumer info
    ("$JS.API.STREAM.INFO.DEAD", b"", "state"),  # nats stream info DEAD
    ("$JS.API.STREAM.MSG.GET.DEAD", b'{"seq": 1}', "error"),  # nats stream get DEAD 1
    ("$JS.API.STREAM.INFO.KV_results", b"", "config"),  # nats kv info results
    ("$JS.API.STREAM.INFO.KV_workers", b"", "config"),  # nats kv info workers
]


@pytest.mark.parametrize(("subject", "body", "key"), CLIENT_CLI_CALLS)
async def test_client_may_make_the_documented_nats_calls(
    hub: EmbeddedServer, subject: str, body: bytes, key: str
) -> None:
    errors: list[str] = []
    nc = await _connect(hub.url, "client", errors)
    try:
        reply = await nc.request(subject, body, timeout=5)
    finally:
        await nc.close()
    # DEAD is empty here: "no message found" is an answer, where a denial is none at all.
    assert key in json.loads(reply.data), reply.data
    assert not errors


async def test_client_may_list_and_read_buckets_and_view_tasks(hub: EmbeddedServer) -> None:
    errors: list[str] = []
    nc = await _connect(hub.url, "client", errors)
    try:
        js = nc.jetstream(timeout=5)
        await js.publish("tasks.chat.any", b'{"id": "cli-view", "prompt": "x"}')
        # nats kv ls results / nats kv get results ID
        results = await js.key_value("results")
        with pytest.raises(nats.js.errors.NoKeysError):
            await results.keys()
        # nats stream view TASKS reads a work-queue stream with direct gets
        viewed = await js.get_msg(TASKS_STREAM, subject="tasks.chat.any", direct=True)
        assert json.loads(viewed.data)["id"] == "cli-view"
    finally:
        await nc.close()
    assert not errors


async def test_worker_cannot_create_what_is_missing(hub: EmbeddedServer) -> None:
    nc = await nats.connect(**role_connection(hub.url, "worker").options())
    try:
        # A short API timeout: the server drops a denied request without an answer.
        js = nc.jetstream(timeout=1)
        with pytest.raises(ConfigError, match=r"consumer chat-nobody-s on TASKS is missing .*"):
            await declare_capability(js, Capability.for_model("nobody's"), TOPOLOGY, update=False)
    finally:
        await nc.close()


async def test_roles_work_together_with_only_their_rights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("D8_NATS_STORE_DIR", str(tmp_path / "jetstream"))
    server = _start_hub(tmp_path)
    try:
        await _declare(server.url)
        settings = worker_settings(
            server.url, connection=role_connection(server.url, "worker"), worker_id="w-perm"
        )
        client = OrchestratorSettings(
            connection=role_connection(server.url, "client"), declare=False, watch_workers=False
        )
        async with running_worker(settings), Orchestrator(client) as submitter:
            tasks = [
                Task(id="perm-ok", prompt="hi", reply_to="_INBOX.someone"),
                Task(id="perm-stream", prompt="a b c", model="echo", stream=True),
                Task(id="perm-bad", prompt="x", metadata={"echo": {"fail": "invalid"}}),
            ]
            _, results = await submitter.run(tasks, timeout_s=15)
            assert {k: r.status for k, r in results.items()} == {
                "perm-ok": "ok",
                "perm-stream": "ok",
                "perm-bad": "error",
            }
            # What `d8 workers` does, as a client.
            kv = await submitter.js.key_value(WORKERS_BUCKET)
            assert "w-perm" in await kv.keys()
            entry = await kv.get("w-perm")
            assert entry.value is not None
            assert decode_heartbeat(entry.value).worker_id == "w-perm"
            # What the worker container's health check does, with the worker's rights.
            check = await check_heartbeat(settings.connection, "w-perm", 5.0, 5.0)
            assert check.ok, check.detail
            # What `d8 status` reads, as a client: queues, workers, the newest dead letter.
            snapshot = await StatusCollector(submitter.js).collect()
            assert snapshot.dead_total == 1
            assert [f.task_id for f in snapshot.recent_failures] == ["perm-bad"]
        await _orchestrator_moves_a_task(server.url)
    finally:
        server.stop()
    assert "Violation" not in (tmp_path / "nats.log").read_text()


async def _orchestrator_moves_a_task(url: str) -> None:
    """What orchestrator/routing.py does to move queued tasks: pull, republish, ack."""
    settings = OrchestratorSettings(connection=role_connection(url, "orchestrator"))
    async with Orchestrator(settings) as orchestrator:
        stranded = Capability.for_model("nobody-serves-this")
        await declare_capability(orchestrator.js, stranded, TOPOLOGY, update=True)
        await orchestrator.submit(Task(id="perm-move", prompt="x", model="nobody-serves-this"))
        subscription = await orchestrator.js.pull_subscribe_bind(
            stranded.consumer, stream=TASKS_STREAM
        )
        [msg] = await subscription.fetch(1, timeout=5)
        await orchestrator.js.publish(Capability.for_model(None).subject, msg.data)
        await msg.ack_sync()
        await subscription.unsubscribe()
