"""`d8 setup`: prepare one node of the mesh: look at the host, pick a model, write `.env`.

It detects a Raspberry Pi from the device tree and `/proc/cpuinfo`, reads the RAM from
`/proc/meminfo`, picks the largest model that fits, checks Docker and free disk, asks the
few questions it must (or takes flags), writes `.env` for the chosen compose profile,
and can start the profile or install a systemd unit. Every path it reads is below a root
directory, so tests can point it at fake device trees.

Running it again is safe: existing values in `.env` (passwords above all) are kept unless a
flag replaces them, an unchanged `.env` is not rewritten, and the unit file is only
rewritten when its content changes.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.errors import ConfigError

__all__ = [
    "MODEL_TIERS",
    "PROFILES",
    "HostFacts",
    "ModelChoice",
    "SetupOptions",
    "SetupReport",
    "choose_model",
    "detect_host",
    "merge_env",
    "read_env",
    "run_setup",
]

PROFILES = ("hub", "worker-ollama", "worker-groq", "worker-gemini", "all")
_OLLAMA_PROFILES = ("worker-ollama", "all")
_HUB_PROFILES = ("hub", "all")
# Each role's password; the hub generates all of them, a node copies what it needs.
_HUB_SECRETS = (
    "D8_ORCHESTRATOR_PASSWORD",
    "D8_WORKER_PASSWORD",
    "D8_CLIENT_PASSWORD",
    "D8_LEAF_PASSWORD",
)
_SECRET_BYTES = 24


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What setup knows about the machine."""

    model: str
    is_pi: bool
    arch: str
    cpus: int
    mem_total_mb: int


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The Ollama model for this host, the memory to give Ollama, and why."""

    name: str
    size_gb: float
    ollama_memory: str
    reason: str


# (minimum MemTotal in MiB, model, download size in GB, Ollama memory limit). MemTotal is
# what the kernel reports: an 8 GB Pi 4 shows about 7,800 MiB, a 4 GB one about 3,800 MiB.
# The 4-bit weights need about their download size in RAM plus ~1 GB of context and
# runtime, and the OS, the leaf node and the worker need ~0.8 GB beside Ollama.
MODEL_TIERS: tuple[tuple[int, str, float, str], ...] = (
    (30_000, "deepseek-coder:33b", 18.8, "24g"),
    (6_500, "deepseek-coder:6.7b", 3.8, "6g"),
    (3_000, "deepseek-coder:1.3b", 0.8, "2560m"),
    (1_800, "deepseek-coder:1.3b", 0.8, "1280m"),
)
# A Pi's CPU makes 33B far too slow to be useful, whatever the RAM.
_PI_LARGEST = "deepseek-coder:6.7b"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def detect_host(root: Path = Path("/"), arch: str | None = None) -> HostFacts:
    """Read the device tree, `/proc/cpuinfo` and `/proc/meminfo` below `root`."""
    model = ""
    for relative in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        model = _read_text(root / relative).strip("\0\n ")
        if model:
            break
    cpuinfo = _read_text(root / "proc/cpuinfo")
    cpus = 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor":
            cpus += 1
        elif key in ("model", "hardware") and not model and "raspberry" in value.lower():
            model = value.strip()
    mem_total_mb = 0
    for line in _read_text(root / "proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_total_mb = int(line.split()[1]) // 1024
    return HostFacts(
        model=model,
        is_pi="raspberry pi" in model.lower(),
        arch=arch or platform.machine(),
        cpus=cpus or os.cpu_count() or 1,
        mem_total_mb=mem_total_mb,
    )


def choose_model(facts: HostFacts, wanted: str | None = None) -> ModelChoice:
    """The largest DeepSeek Coder that fits the RAM; `wanted` overrides the name."""
    for min_mb, name, size_gb, memory in MODEL_TIERS:
        if facts.is_pi and min_mb > MODEL_TIERS[1][0]:
            continue
        if facts.mem_total_mb >= min_mb:
            why = f"{facts.mem_total_mb} MiB RAM" + (" on a Raspberry Pi" if facts.is_pi else "")
            if wanted and wanted != name:
                return ModelChoice(wanted, 0.0, memory, f"asked for; {name} would fit {why}")
            return ModelChoice(name, size_gb, memory, f"largest that fits {why}")
    raise ConfigError(
        f"{facts.mem_total_mb} MiB RAM is too little for a local model (need {MODEL_TIERS[-1][0]}"
        " MiB): use the worker-groq or worker-gemini profile on this machine"
    )


def read_env(path: Path) -> dict[str, str]:
    """`KEY=value` pairs of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in _read_text(path).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            continue
        key, _, value = stripped.partition("=")
        values[key.strip()] = value.strip()
    return values


def merge_env(template: str, values: Mapping[str, str]) -> str:
    """The template with each `KEY=` line set from `values`; unknown keys are appended."""
    lines, seen = [], set()
    for line in template.splitlines():
        key, sep, _ = line.partition("=")
        key = key.strip()
        if sep and not key.startswith("#") and key in values:
            lines.append(f"{key}={values[key]}")
            seen.add(key)
        else:
            lines.append(line)
    extra = [f"{k}={v}" for k, v in values.items() if k not in seen]
    if extra:
        lines += ["", "# Added by d8 setup", *extra]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SetupOptions:
    """The answers `d8 setup` works from; None means "ask, or keep what .env has"."""

    profile: str
    project_dir: Path = field(default_factory=Path.cwd)
    env_file: Path | None = None
    root: Path = Path("/")
    hub: str | None = None
    node_name: str | None = None
    model: str | None = None
    given: Mapping[str, str] = field(default_factory=dict)
    start: bool = True
    systemd: bool = False
    interactive: bool = False


@dataclass
class SetupReport:
    """What setup found, decided and did, in the order it happened."""

    facts: HostFacts | None = None
    model: ModelChoice | None = None
    env_file: Path | None = None
    env_changed: bool = False
    unit_file: Path | None = None
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


Ask = Callable[[str, bool], str]
Run = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


#: A check (`docker info`) answers in seconds; a start may wait for a model download.
CHECK_TIMEOUT_S = 120.0
# `docker compose up -d` waits for the ollama-pull service, which downloads the model:
# 3.8 GB for a 6.7B model is over an hour on a 5 Mbit/s line.
START_TIMEOUT_S = 4 * 3600.0


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
    )


def _start(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a start command with its output on the terminal, so a model pull shows progress."""
    return subprocess.run(command, text=True, timeout=START_TIMEOUT_S, check=False)


def check_docker(run: Run = _run) -> str | None:
    """None when Docker and its compose plugin answer; otherwise what is wrong."""
    if shutil.which("docker") is None:
        return "docker is not installed (https://docs.docker.com/engine/install/debian/)"
    try:
        if run(["docker", "info", "--format", "{{.ServerVersion}}"]).returncode != 0:
            return (
                "docker is installed but its daemon does not answer (is your user in group docker?)"
            )
        if run(["docker", "compose", "version", "--short"]).returncode != 0:
            return "the docker compose plugin is missing (apt install docker-compose-plugin)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker did not answer: {exc}"
    return None


def check_disk(path: Path, need_gb: float) -> str | None:
    """None when `path`'s file system has `need_gb` free; otherwise how much is missing."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    if free_gb < need_gb:
        return f"{probe} has {free_gb:.1f} GB free, {need_gb:.1f} GB needed"
    return None


def _required(
    name: str, flag: str, current: str | None, ask: Ask | None, *, secret: bool = False
) -> str:
    if current:
        return current
    if ask is None:
        raise ConfigError(f"{name} is needed: pass {flag} (running without a terminal)")
    answer = ask(name, secret).strip()
    if not answer:
        raise ConfigError(f"{name} is needed: pass {flag}")
    return answer


def _host_port(hub: str, default_port: int) -> tuple[str, int]:
    host = hub.split("://", 1)[-1].rsplit("@", 1)[-1].strip("/")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        if not port.isdigit():
            raise ConfigError(f"--hub {hub!r}: the port must be a number")
        return name, int(port)
    return host, default_port


def plan_env(options: SetupOptions, existing: Mapping[str, str], ask: Ask | None) -> dict[str, str]:
    """The `.env` values for the profile: kept, given, asked for or generated."""
    values = {k: v for k, v in existing.items() if v}
    values.update({k: v for k, v in options.given.items() if v})
    profile = options.profile
    values["COMPOSE_PROFILES"] = profile
    if options.node_name:
        values["D8_NODE_NAME"] = options.node_name
    values.setdefault("D8_NODE_NAME", _default_node_name(options.root))
    if profile in _HUB_PROFILES:
        for name in _HUB_SECRETS:
            values.setdefault(name, secrets.token_urlsafe(_SECRET_BYTES))
    if profile == "worker-ollama":
        # The leaf's own worker user is local to the Pi: a fresh password does.
        values.setdefault("D8_WORKER_PASSWORD", secrets.token_urlsafe(_SECRET_BYTES))
        hub = _required("hub address", "--hub", options.hub or values.get("D8_HUB"), ask)
        values["D8_HUB"] = hub
        leaf_password = _required(
            "the hub's D8_LEAF_PASSWORD",
            "--leaf-password",
            values.get("D8_LEAF_PASSWORD"),
            ask,
            secret=True,
        )
        values["D8_LEAF_PASSWORD"] = leaf_password
        host, port = _host_port(hub, 7422)
        values["D8_HUB_LEAF_URL"] = f"nats-leaf://leaf:{leaf_password}@{host}:{port}"
    if profile in ("worker-groq", "worker-gemini"):
        hub = _required("hub address", "--hub", options.hub or values.get("D8_HUB"), ask)
        values["D8_HUB"] = hub
        host, port = _host_port(hub, 4222)
        values["D8_HUB_URL"] = f"nats://{host}:{port}"
        values["D8_WORKER_PASSWORD"] = _required(
            "the hub's D8_WORKER_PASSWORD",
            "--worker-password",
            values.get("D8_WORKER_PASSWORD"),
            ask,
            secret=True,
        )
    if profile == "all":
        # Everything on one machine: the leaf and cloud workers reach the hub's container.
        values["D8_HUB_LEAF_URL"] = f"nats-leaf://leaf:{values['D8_LEAF_PASSWORD']}@nats-hub:7422"
        values["D8_HUB_URL"] = "nats://nats-hub:4222"
    for key_name, key_profile in (
        ("GROQ_API_KEY", "worker-groq"),
        ("GEMINI_API_KEY", "worker-gemini"),
    ):
        if profile == key_profile:
            values[key_name] = _required(
                key_name, f"the {key_name} variable", values.get(key_name), ask, secret=True
            )
    return values


def _default_node_name(root: Path) -> str:
    name = _read_text(root / "etc/hostname").strip() or platform.node() or "d8-node"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _write_if_changed(path: Path, content: str, mode: int) -> bool:
    if _read_text(path) == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # Created with its final mode, so a secret is never readable by others, not even briefly.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chmod(partial, mode)
    os.replace(partial, path)
    return True


def _unit_text(options: SetupOptions) -> str:
    template = (options.project_dir / "deploy/systemd/d8-compose.service").read_text()
    return template.replace("/opt/d8-mesh", str(options.project_dir.resolve()))


def _write_env(options: SetupOptions, report: SetupReport, ask: Ask | None) -> Path:
    """Decide every value of `.env` and write it when it changed; return its path."""
    assert report.facts is not None
    env_file = options.env_file or options.project_dir / ".env"
    template_file = options.project_dir / "deploy/env" / f"{options.profile}.env.example"
    if not template_file.is_file():
        raise ConfigError(f"{template_file} not found: run d8 setup in a d8-mesh checkout")
    values = plan_env(options, read_env(env_file), ask)
    if values["D8_NODE_NAME"] == "raspberrypi" and options.profile != "hub":
        # Leaf server names and worker ids must differ between nodes.
        report.notes.append("warning: default host name raspberrypi: give each Pi --node-name")
    need_gb = 2.0
    if options.profile in _OLLAMA_PROFILES:
        report.model = choose_model(report.facts, options.model or values.get("D8_OLLAMA_MODEL"))
        values["D8_OLLAMA_MODEL"] = report.model.name
        values["D8_OLLAMA_MEMORY"] = report.model.ollama_memory
        need_gb += report.model.size_gb
    if options.profile == "all":
        for key_name in ("GROQ_API_KEY", "GEMINI_API_KEY"):
            if not values.get(key_name):
                report.notes.append(f"no {key_name}: its worker will stop with a config error")
    disk = check_disk(options.root / "var/lib/docker", need_gb)
    if disk:
        report.notes.append(f"warning: {disk}")
    report.env_file = env_file
    report.env_changed = _write_if_changed(
        env_file, merge_env(template_file.read_text(), values), 0o600
    )
    return env_file


def _start_commands(options: SetupOptions, report: SetupReport, env_file: Path, run: Run) -> None:
    if options.systemd:
        unit = options.root / "etc/systemd/system/d8-mesh.service"
        if _write_if_changed(unit, _unit_text(options), 0o644):
            report.notes.append(f"systemd unit written: {unit}")
        report.unit_file = unit
        if options.start:
            report.commands.append(["systemctl", "daemon-reload"])
            report.commands.append(["systemctl", "enable", "--now", "d8-mesh.service"])
    elif options.start:
        problem = check_docker(run)
        if problem:
            raise ConfigError(f"cannot start the {options.profile} profile: {problem}")
        compose_file = str(options.project_dir / "compose.yaml")
        report.commands.append(
            ["docker", "compose", "-f", compose_file, "--env-file", str(env_file), "up", "-d"]
        )


def run_setup(
    options: SetupOptions, ask: Ask | None = None, run: Run = _run, start: Run = _start
) -> SetupReport:
    """Detect, decide, write `.env`, then start the profile or install the unit."""
    if options.profile not in PROFILES:
        raise ConfigError(
            f"unknown profile {options.profile!r}: choose one of {', '.join(PROFILES)}"
        )
    report = SetupReport(facts=detect_host(options.root))
    if report.facts is not None and report.facts.is_pi:
        report.notes.append(f"Raspberry Pi detected: {report.facts.model}")
    env_file = _write_env(options, report, ask)
    _start_commands(options, report, env_file, run)
    for command in report.commands:
        shown = " ".join(command)
        try:
            done = start(command)
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"`{shown}` was still running after {START_TIMEOUT_S / 3600:.0f} h and was "
                "stopped; see `docker compose logs ollama-pull`, then run setup again"
            ) from None
        except OSError as exc:
            raise ConfigError(f"`{shown}` could not run: {exc}") from None
        if done.returncode != 0:
            why = (done.stderr or "").strip()[-500:] or "its output is above"
            raise ConfigError(f"`{shown}` failed with exit code {done.returncode}: {why}")
    return report
