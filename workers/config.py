"""Building a worker's settings from flags and `D8_*` variables, checked before start."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mesh.connection import ConnectionSettings
from mesh.errors import ConfigError
from mesh.settings import env_bool, env_float, env_int, topology_from_env
from mesh.topology import model_token
from workers.backends import REGISTRY, BackendSettings
from workers.execution import RetryPolicy
from workers.runtime import WorkerSettings

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

__all__ = ["worker_settings_from"]


def worker_settings_from(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Flags win over variables; every value is checked here, not at first use."""
    env = os.environ if env is None else env
    if args.backend not in REGISTRY:
        choices = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown backend {args.backend!r}: choose one of {choices}")
    models = tuple(
        args.model or [m.strip() for m in env.get("D8_MODELS", "").split(",") if m.strip()]
    )
    for model in models:
        try:
            model_token(model)
        except ValueError as exc:
            raise ConfigError(f"--model {model!r}: {exc}") from None
    concurrency = (
        args.concurrency if args.concurrency is not None else env_int(env, "D8_CONCURRENCY", 0)
    )
    if concurrency < 0:
        raise ConfigError(
            f"--concurrency {concurrency}: use 1 or more (0 or unset: the backend's default)"
        )
    topology = topology_from_env(env)
    grace_s = _seconds(args.grace_s, "--grace-s", env, "D8_GRACE_S", 30.0, minimum=0)
    timeout_s = _seconds(
        args.timeout_s, "--timeout-s", env, "D8_BACKEND_TIMEOUT_S", 600.0, minimum=1
    )
    return WorkerSettings(
        backend=args.backend,
        backend_settings=BackendSettings(
            models=models,
            base_url=args.base_url,
            timeout_s=timeout_s,
            pull=args.pull or env_bool(env, "D8_PULL", False),
            rpm=_rpm(args, env),
        ),
        concurrency=concurrency or None,
        worker_id=args.worker_id,
        serve_any=not args.no_any and env_bool(env, "D8_SERVE_ANY", True),
        grace_s=grace_s,
        retry=RetryPolicy(
            max_deliver=topology.max_deliver,
            base_delay_s=env_float(env, "D8_RETRY_BASE_S", RetryPolicy().base_delay_s),
            max_delay_s=env_float(env, "D8_RETRY_MAX_S", RetryPolicy().max_delay_s, minimum=0.1),
        ),
        topology=topology,
        connection=ConnectionSettings.from_env(env, name=f"d8-worker-{args.backend}"),
    )


def _seconds(
    flag_value: float | None,
    flag: str,
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float,
) -> float:
    """A duration from its flag, else from `name` in `env`; either way at least `minimum`."""
    if flag_value is None:
        return env_float(env, name, default, minimum=minimum)
    if flag_value < minimum:
        raise ConfigError(
            f"{flag} {flag_value:g} is below {minimum:g}; use for example {default:g}"
        )
    return flag_value


def _rpm(args: argparse.Namespace, env: Mapping[str, str]) -> float | None:
    """Requests per minute from `--rpm` or `D8_RPM`; 0 or unset means no limit."""
    rpm = getattr(args, "rpm", None)
    if rpm is None:
        rpm = env_float(env, "D8_RPM", 0.0)
    if rpm < 0:
        raise ConfigError(
            f"--rpm {rpm:g}: use a positive number of requests per minute (0: no limit)"
        )
    return float(rpm) or None
