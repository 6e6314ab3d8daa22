"""`d8 health`: the container health check, one meaningful probe per role.

A port that accepts connections says little. So each role checks what it exists for:

- `worker`: it can reach NATS with its own credentials, and its own heartbeat is in the
  `workers` bucket and fresh (a worker whose heartbeat loop died or whose NATS link broke
  is unhealthy even though its process runs);
- `orchestrator`: NATS is reachable and the HTTP API's `/health` answers 200, which it does
  only while the orchestrator's own NATS connection is up;
- `nats`: the server's monitoring endpoint `/healthz` answers ok (JetStream included
  where it is enabled), and on a leaf node (D8_HUB_LEAF_URL set) the link to the hub is up.

The role comes from `--role`, else `D8_ROLE`, else the command of PID 1 (the container's
main process), so one image-wide HEALTHCHECK fits every service.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import msgspec
from nats.aio.client import Client as NATSClient
from nats.js.errors import NotFoundError

from mesh.connection import ConnectionSettings, jetstream
from mesh.contract import decode_heartbeat
from mesh.errors import ConfigError
from mesh.settings import env_float
from mesh.topology import WORKERS_BUCKET, heartbeat_subject

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from nats.aio.client import Client as NATS

__all__ = [
    "ROLES",
    "Check",
    "HealthOptions",
    "check_heartbeat",
    "check_http",
    "check_leaf_link",
    "check_nats",
    "options_from",
    "resolve_role",
    "role_from_command",
    "run_checks",
    "worker_id_from_command",
]

ROLES = ("worker", "orchestrator", "nats")
_KV_WORKERS_STREAM = f"KV_{WORKERS_BUCKET}"
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one probe: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthOptions:
    """What to check; durations in seconds."""

    role: str
    connection: ConnectionSettings
    worker_id: str | None = None
    #: A heartbeat older than this is stale (three beats missed at the default 5 s).
    max_heartbeat_age_s: float = 15.0
    http_url: str = "http://127.0.0.1:7001/health"
    monitor_url: str = "http://127.0.0.1:8222/healthz"
    #: A leaf node is healthy only while its link to the hub is up.
    leaf_link: bool = False
    #: Per probe; two probes plus Python's start stay inside the image's 10 s check timeout.
    timeout_s: float = 4.0


def _read_cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def role_from_command(argv: Sequence[str]) -> str | None:
    """The role a command line runs: `d8 worker ...` -> worker, `nats-server ...` -> nats."""
    for index, word in enumerate(argv):
        name = os.path.basename(word)
        if name.startswith("nats-server") or name == "nats-entrypoint.sh":
            return "nats"
        if name in ("d8", "cli.py") or word == "mesh.cli":
            # The first subcommand word, past options such as `--log-level debug`.
            return next((w for w in argv[index + 1 :] if w in ("worker", "orchestrator")), None)
    return None


def worker_id_from_command(argv: Sequence[str], pid: int, env: Mapping[str, str]) -> str | None:
    """The id a `d8 worker` command line gives itself: `--worker-id`, else its default."""
    for index, word in enumerate(argv):
        if word == "--worker-id" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--worker-id="):
            return word.split("=", 1)[1]
    if env.get("D8_WORKER_ID"):
        return env["D8_WORKER_ID"]
    backend = env.get("D8_BACKEND", "echo")
    for index, word in enumerate(argv):
        if word == "--backend" and index + 1 < len(argv):
            backend = argv[index + 1]
    # Same rule as workers.runtime.default_worker_id, for the process `pid` on this host.
    return _UNSAFE_ID.sub("-", f"{socket.gethostname()}-{backend}-{pid}").strip("-")


def resolve_role(
    role: str | None, env: Mapping[str, str], proc: Path = Path("/proc")
) -> tuple[str, list[str]]:
    """The role to check and PID 1's command line; raise `ConfigError` when unknown."""
    argv = _read_cmdline(proc, 1)
    chosen = role or env.get("D8_ROLE") or role_from_command(argv)
    if chosen not in ROLES:
        raise ConfigError(
            f"cannot tell which role to check (got {chosen!r}): pass --role "
            f"{'|'.join(ROLES)} or set D8_ROLE"
        )
    return chosen, argv


async def _connect_once(settings: ConnectionSettings) -> NATS:
    """Connect without the services' endless reconnects: a probe answers now or fails."""
    # nats-py reads 0 attempts as "no limit"; one attempt per server, a short pause.
    options = {
        **settings.options(),
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.1,
    }
    nc = NATSClient()
    try:
        await nc.connect(**options, error_cb=_quiet)
    except Exception as exc:
        # nats-py raises bare errors here; keep only their text (never the URL's password).
        raise ConfigError(f"cannot connect to NATS: {exc or type(exc).__name__}") from None
    return nc


async def check_nats(settings: ConnectionSettings, timeout_s: float) -> Check:
    """Connect with the role's own credentials and make one round trip."""
    try:
        with anyio.fail_after(timeout_s):
            nc = await _connect_once(settings)
            try:
                started = time.perf_counter()
                await nc.flush(timeout=max(1, round(timeout_s)))
                rtt_ms = (time.perf_counter() - started) * 1000
            finally:
                await nc.close()
    except (ConfigError, TimeoutError, OSError) as exc:
        return Check("nats", False, str(exc) or type(exc).__name__)
    return Check("nats", True, f"connected rtt_ms={rtt_ms:.1f}")


async def _quiet(exc: Exception) -> None:
    # A health probe reports its own verdict; nats-py's background errors add nothing.
    return None


async def check_heartbeat(
    settings: ConnectionSettings, worker_id: str, max_age_s: float, timeout_s: float
) -> Check:
    """Whether `worker_id`'s heartbeat is in the `workers` bucket and younger than `max_age_s`."""
    name = "heartbeat"
    try:
        with anyio.fail_after(timeout_s):
            nc = await _connect_once(settings)
            try:
                js = jetstream(nc, settings)
                msg = await js.get_last_msg(
                    _KV_WORKERS_STREAM, heartbeat_subject(worker_id), direct=True
                )
            finally:
                await nc.close()
    except NotFoundError:
        return Check(name, False, f"no heartbeat for worker_id={worker_id}")
    except (ConfigError, TimeoutError, OSError) as exc:
        return Check(name, False, f"cannot read the workers bucket: {exc or type(exc).__name__}")
    if not msg.data:
        return Check(name, False, f"heartbeat of worker_id={worker_id} was removed (worker left)")
    try:
        heartbeat = decode_heartbeat(msg.data)
    except msgspec.DecodeError as exc:
        return Check(name, False, f"undecodable heartbeat: {exc}")
    age_s = time.time() - heartbeat.sent_at
    if age_s > max_age_s:
        return Check(name, False, f"heartbeat is {age_s:.0f}s old (limit {max_age_s:.0f}s)")
    return Check(
        name, True, f"worker_id={worker_id} age_s={age_s:.1f} in_flight={heartbeat.in_flight}"
    )


async def check_http(name: str, url: str, timeout_s: float) -> Check:
    """Whether `url` answers 200."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return Check(name, False, f"{url}: {type(exc).__name__}")
    if response.status_code != 200:
        return Check(name, False, f"{url}: HTTP {response.status_code} {response.text[:200]}")
    return Check(name, True, f"{url}: HTTP 200")


async def check_leaf_link(monitor_url: str, timeout_s: float) -> Check:
    """Whether this server (a leaf node) has its link to the hub up, from `/leafz`."""
    url = monitor_url.rsplit("/", 1)[0] + "/leafz"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            links = (await client.get(url)).json().get("leafnodes", 0)
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return Check("leaf-link", False, f"{url}: {type(exc).__name__}")
    if not links:
        return Check("leaf-link", False, "no link to the hub: check D8_HUB_LEAF_URL and port 7422")
    return Check("leaf-link", True, f"links={links}")


async def run_checks(options: HealthOptions) -> list[Check]:
    """Every probe of `options.role`, in order; the role is healthy when all pass."""
    if options.role == "nats":
        checks = [await check_http("nats-monitor", options.monitor_url, options.timeout_s)]
        if options.leaf_link:
            checks.append(await check_leaf_link(options.monitor_url, options.timeout_s))
        return checks
    checks = [await check_nats(options.connection, options.timeout_s)]
    if options.role == "worker":
        if options.worker_id is None:
            raise ConfigError("cannot tell the worker's id: set D8_WORKER_ID or pass --worker-id")
        checks.append(
            await check_heartbeat(
                options.connection,
                options.worker_id,
                options.max_heartbeat_age_s,
                options.timeout_s,
            )
        )
    elif options.role == "orchestrator":
        checks.append(await check_http("orchestrator-http", options.http_url, options.timeout_s))
    return checks


def options_from(
    role: str | None,
    worker_id: str | None,
    env: Mapping[str, str] | None = None,
    proc: Path = Path("/proc"),
) -> HealthOptions:
    """Build the health options from flags, `D8_*`/`NATS_*` variables and PID 1's command."""
    env = os.environ if env is None else env
    chosen, argv = resolve_role(role, env, proc)
    if chosen == "worker" and worker_id is None:
        worker_id = env.get("D8_WORKER_ID") or worker_id_from_command(argv, 1, env)
    interval_s = env_float(env, "D8_HEARTBEAT_S", 5.0, minimum=0.5)
    port = env.get("D8_HTTP_PORT", "7001")
    connection = ConnectionSettings.from_env(env, name=f"d8-health-{socket.gethostname()}")
    return HealthOptions(
        role=chosen,
        connection=connection,
        worker_id=worker_id,
        max_heartbeat_age_s=3 * interval_s,
        http_url=env.get("D8_HEALTH_URL", f"http://127.0.0.1:{port}/health"),
        monitor_url=env.get("D8_NATS_MONITOR_URL", "http://127.0.0.1:8222/healthz"),
        # The leaf's container has the hub's address; the hub's does not.
        leaf_link=bool(env.get("D8_HUB_LEAF_URL")),
        timeout_s=env_float(env, "D8_HEALTH_TIMEOUT_S", HealthOptions.timeout_s, minimum=0.5),
    )
