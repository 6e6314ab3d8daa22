"""Reading settings from the environment, with messages that say what is wrong and how to fix it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mesh.errors import ConfigError
from mesh.topology import TopologySettings

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["env_bool", "env_float", "env_int", "topology_from_env"]


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """A number of seconds (or other float) from `env[name]`, at least `minimum`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a number; set it like {name}={default:g}"
        ) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw} is below {minimum:g}; set it like {name}={default:g}")
    return value


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    """A whole number from `env[name]`, from `minimum` to `maximum`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a whole number; set it like {name}={default}"
        ) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw} is below {minimum}; set it like {name}={default}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw} is above {maximum}; set it like {name}={default}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no from `env[name]` (1/0, true/false, yes/no, on/off)."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a yes/no value; use 1 or 0")


def topology_from_env(env: Mapping[str, str] | None = None) -> TopologySettings:
    """Stream, consumer and bucket settings from `D8_*` variables."""
    env = os.environ if env is None else env
    defaults = TopologySettings()
    settings = TopologySettings(
        ack_wait_s=env_float(env, "D8_ACK_WAIT_S", defaults.ack_wait_s, minimum=1),
        max_deliver=env_int(env, "D8_MAX_DELIVER", defaults.max_deliver, minimum=1),
        duplicate_window_s=env_float(
            env, "D8_DUPLICATE_WINDOW_S", defaults.duplicate_window_s, minimum=1
        ),
        results_ttl_s=env_float(env, "D8_RESULTS_TTL_S", defaults.results_ttl_s, minimum=1),
        heartbeat_interval_s=env_float(
            env, "D8_HEARTBEAT_S", defaults.heartbeat_interval_s, minimum=0.5
        ),
        replicas=env_int(env, "D8_REPLICAS", defaults.replicas, minimum=1),
    )
    if settings.replicas not in (1, 3, 5):
        raise ConfigError(
            f"D8_REPLICAS={settings.replicas}: JetStream replicas should be 1, 3 or 5"
        )
    return settings
