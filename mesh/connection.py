"""Connecting to NATS: settings from the environment, reconnect policy, redacted logging."""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import nats.errors
from nats.aio.client import Client as NATSClient

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

__all__ = [
    "NATS_ERRORS",
    "ConnectionSettings",
    "api_prefix",
    "close_quietly",
    "connect",
    "jetstream",
    "redact_url",
]

logger = logging.getLogger(__name__)


#: What a NATS call raises when the server is away or the connection is going: timeouts,
#: a connection closed or reconnecting, and the socket errors under them.
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, TimeoutError)


def redact_url(url: str) -> str:
    """The URL with any user, password or token replaced by `***`."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach NATS. Secrets are kept out of `repr`."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "d8"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    inbox_prefix: str | None = None
    js_domain: str | None = None
    connect_timeout_s: float = 5.0
    reconnect_wait_s: float = 0.5
    #: Tries at start-up (reconnect_wait_s apart); once connected, reconnects never stop.
    connect_attempts: int = 6

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, name: str = "d8"
    ) -> ConnectionSettings:
        """Read `NATS_URL` (comma-separated), credentials and TLS files from the environment."""
        env = os.environ if env is None else env
        url = env.get("NATS_URL", "").strip()
        servers = tuple(u.strip() for u in url.split(",") if u.strip()) or cls.servers
        settings = cls(
            servers=servers,
            name=name,
            user=env.get("NATS_USER") or None,
            password=env.get("NATS_PASSWORD") or None,
            token=env.get("NATS_TOKEN") or None,
            creds_file=env.get("NATS_CREDS") or None,
            nkey_seed_file=env.get("NATS_NKEY_SEED") or None,
            tls_ca_file=env.get("NATS_CA") or None,
            tls_cert_file=env.get("NATS_CERT") or None,
            tls_key_file=env.get("NATS_KEY") or None,
            inbox_prefix=env.get("NATS_INBOX_PREFIX") or None,
            js_domain=env.get("D8_JS_DOMAIN") or None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise `ConfigError` for files that do not exist."""
        for variable, path in (
            ("NATS_CREDS", self.creds_file),
            ("NATS_NKEY_SEED", self.nkey_seed_file),
            ("NATS_CA", self.tls_ca_file),
            ("NATS_CERT", self.tls_cert_file),
            ("NATS_KEY", self.tls_key_file),
        ):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{variable} names {path!r}, which is not a readable file")

    def _tls(self) -> ssl.SSLContext | None:
        if not (self.tls_ca_file or self.tls_cert_file):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`, without callbacks."""
        options: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout_s,
            "max_reconnect_attempts": self.connect_attempts,
            "reconnect_time_wait": self.reconnect_wait_s,
            "user": self.user,
            "password": self.password,
            "token": self.token,
            "user_credentials": self.creds_file,
            "nkeys_seed": self.nkey_seed_file,
            "tls": self._tls(),
        }
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return {key: value for key, value in options.items() if value is not None}


class RepeatedErrors:
    """Lets an error message through once per `every_s` while it keeps coming."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: str | None = None
        self._logged_at = 0.0
        self._muted = 0

    def muted(self, text: str, now: float) -> int | None:
        """None to stay quiet; else how many of the same were kept quiet since it was shown."""
        if text == self._last and now - self._logged_at < self.every_s:
            self._muted += 1
            return None
        muted = self._muted if text == self._last else 0
        self._last, self._logged_at, self._muted = text, now, 0
        return muted


async def connect(settings: ConnectionSettings, **callbacks: Any) -> NATS:
    """Connect with the mesh's reconnect policy; callbacks default to logging."""
    shown = ",".join(redact_url(u) for u in settings.servers)

    refused: list[str] = []
    repeats = RepeatedErrors()

    async def on_error(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if "authorization violation" in text.lower():
            refused.append(text)
        # While the server is away each reconnect attempt (twice a second) fails the same way.
        if (muted := repeats.muted(text, time.monotonic())) is None:
            return
        again = f" (and {muted} times more)" if muted else ""
        logger.warning("nats error name=%s error=%s%s", settings.name, text, again)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            logger.warning("nats disconnected name=%s", settings.name)

    async def on_reconnected() -> None:
        logger.warning("nats reconnected name=%s", settings.name)

    callbacks.setdefault("error_cb", on_error)
    callbacks.setdefault("disconnected_cb", on_disconnected)
    callbacks.setdefault("reconnected_cb", on_reconnected)
    nc = NATSClient()
    try:
        await nc.connect(**settings.options(), **callbacks)
    except Exception as exc:
        if refused:
            raise ConfigError(
                f"NATS at {shown} refused our credentials (authorization violation): check "
                "NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or NATS_NKEY_SEED"
            ) from None
        # nats-py's errors give no hint; say where and how. Its message may hold the URL.
        raise ConfigError(
            f"cannot connect to NATS at {shown}: {type(exc).__name__}. "
            "Check NATS_URL and that the server runs (`d8 server` starts one)."
        ) from None
    # Long-lived processes never give up once connected: nats-py's default gives up after
    # about 2 minutes, after which every fetch fails even when the server is back.
    nc.options["max_reconnect_attempts"] = -1
    logger.info("nats connected name=%s servers=%s", settings.name, shown)
    return nc


def jetstream(nc: NATS, settings: ConnectionSettings) -> JetStreamContext:
    """The JetStream context, in the hub's domain when one is set (leaf nodes)."""
    if settings.js_domain:
        return nc.jetstream(domain=settings.js_domain, timeout=10)
    return nc.jetstream(timeout=10)


def api_prefix(settings: ConnectionSettings) -> str:
    """The JetStream API subject prefix, with the hub's domain when one is set."""
    return f"$JS.{settings.js_domain}.API" if settings.js_domain else "$JS.API"


async def close_quietly(nc: NATS, drain_timeout_s: float = 5.0) -> None:
    """Drain, and close when the drain cannot finish: at exit, with NATS up or not.

    A drain while the connection is reconnecting raises, and one that a busy subscription
    keeps going would leave the socket and the client's tasks behind.
    """
    try:
        with anyio.move_on_after(drain_timeout_s, shield=True):
            await nc.drain()
    except NATS_ERRORS as exc:
        logger.warning("nats drain failed, closing error=%r", exc)
    if not nc.is_closed:
        try:
            with anyio.move_on_after(2, shield=True):
                await nc.close()
        except NATS_ERRORS as exc:
            # Flushing what was buffered for a server that went away; nothing left to save.
            logger.warning("nats close failed error=%r", exc)
