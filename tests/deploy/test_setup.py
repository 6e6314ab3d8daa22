"""`d8 setup` against fake device trees: a Pi 4 with 4 GB, one with 8 GB, an x86 server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from mesh.errors import ConfigError
from mesh.node_setup import SetupOptions, choose_model, detect_host, read_env, run_setup
from tests.helpers import ROOT

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)

_PI_CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""
_PI_TAIL = """Hardware\t: BCM2835
Revision\t: {revision}
Serial\t\t: 10000000a1b2c3d4
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
_X86_CPU = """processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz
"""
# MemTotal as the kernel reports it: less than the RAM printed on the box.
HOSTS = {
    "pi4-4gb": ("Raspberry Pi 4 Model B Rev 1.4", 4, 3_882_288, "c03114"),
    "pi4-8gb": ("Raspberry Pi 4 Model B Rev 1.4", 4, 7_998_516, "d03114"),
    "x86-server": ("", 16, 65_856_420, ""),
}


def fake_root(tmp_path: Path, host: str, *, device_tree: bool = True) -> Path:
    """A directory laid out like / with the files setup reads."""
    model, cpus, mem_kb, revision = HOSTS[host]
    root = tmp_path / host
    (root / "proc").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text(f"{host}\n")
    if model:
        cpuinfo = "\n".join(_PI_CPU.format(n=n) for n in range(cpus)) + "\n"
        cpuinfo += _PI_TAIL.format(revision=revision)
        if device_tree:
            (root / "proc/device-tree").mkdir()
            (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    else:
        cpuinfo = "\n".join(_X86_CPU.format(n=n) for n in range(cpus))
    (root / "proc/cpuinfo").write_text(cpuinfo)
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:   1000 kB\n")
    return root


@pytest.mark.parametrize(
    ("host", "is_pi", "cpus", "model", "memory"),
    [
        ("pi4-4gb", True, 4, "deepseek-coder:1.3b", "2560m"),
        ("pi4-8gb", True, 4, "deepseek-coder:6.7b", "6g"),
        ("x86-server", False, 16, "deepseek-coder:33b", "24g"),
    ],
)
def test_host_and_model(
    tmp_path: Path, host: str, is_pi: bool, cpus: int, model: str, memory: str
) -> None:
    facts = detect_host(fake_root(tmp_path, host), arch="aarch64" if is_pi else "x86_64")
    assert facts.is_pi is is_pi
    assert facts.cpus == cpus
    assert facts.mem_total_mb == HOSTS[host][2] // 1024
    choice = choose_model(facts)
    assert (choice.name, choice.ollama_memory) == (model, memory)


def test_pi_without_device_tree_is_found_from_cpuinfo(tmp_path: Path) -> None:
    facts = detect_host(fake_root(tmp_path, "pi4-8gb", device_tree=False))
    assert facts.is_pi
    assert facts.model == "Raspberry Pi 4 Model B Rev 1.4"


def test_too_little_ram_points_to_the_cloud_profiles(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "pi4-4gb")
    (root / "proc/meminfo").write_text("MemTotal:  948304 kB\n")
    with pytest.raises(ConfigError, match="use the worker-groq or worker-gemini profile"):
        choose_model(detect_host(root))


def _options(tmp_path: Path, root: Path, profile: str, **changes: object) -> SetupOptions:
    fields: dict[str, object] = {
        "profile": profile,
        "project_dir": ROOT,
        "env_file": tmp_path / f"{profile}.env",
        "root": root,
        "start": False,
    }
    fields.update(changes)
    return SetupOptions(**fields)  # type: ignore[arg-type]


def test_hub_setup_generates_secrets_and_is_safe_to_rerun(tmp_path: Path) -> None:
    options = _options(tmp_path, fake_root(tmp_path, "x86-server"), "hub")
    first = run_setup(options)
    assert first.env_changed
    assert first.env_file is not None
    assert stat.S_IMODE(first.env_file.stat().st_mode) == 0o600
    values = read_env(first.env_file)
    assert values["COMPOSE_PROFILES"] == "hub"
    assert values["D8_NODE_NAME"] == "x86-server"
    passwords = {k: v for k, v in values.items() if k.endswith("_PASSWORD")}
    assert len(passwords) == 4
    assert all(len(v) >= 32 for v in passwords.values())
    assert len(set(passwords.values())) == 4

    again = run_setup(options)
    assert not again.env_changed
    assert read_env(first.env_file) == values

    renamed = run_setup(_options(tmp_path, options.root, "hub", node_name="hub-2"))
    assert renamed.env_changed
    after = read_env(first.env_file)
    assert after["D8_NODE_NAME"] == "hub-2"
    assert {k: after[k] for k in passwords} == passwords


@pytest.mark.parametrize(
    ("host", "model", "memory"),
    [("pi4-4gb", "deepseek-coder:1.3b", "2560m"), ("pi4-8gb", "deepseek-coder:6.7b", "6g")],
)
def test_pi_node_setup(tmp_path: Path, host: str, model: str, memory: str) -> None:
    options = _options(
        tmp_path,
        fake_root(tmp_path, host),
        "worker-ollama",
        hub="hub.lan",
        given={"D8_LEAF_PASSWORD": "leaf-password-from-the-hub"},
    )
    report = run_setup(options)
    assert report.model is not None
    assert report.model.name == model
    assert report.notes[0] == "Raspberry Pi detected: Raspberry Pi 4 Model B Rev 1.4"
    values = read_env(tmp_path / "worker-ollama.env")
    assert values["D8_OLLAMA_MODEL"] == model
    assert values["D8_OLLAMA_MEMORY"] == memory
    assert values["D8_HUB_LEAF_URL"] == "nats-leaf://leaf:leaf-password-from-the-hub@hub.lan:7422"
    assert len(values["D8_WORKER_PASSWORD"]) >= 32
    # A re-run without the flags keeps what the first run was told.
    assert not run_setup(_options(tmp_path, options.root, "worker-ollama")).env_changed


def test_missing_answers_fail_without_a_terminal_and_are_asked_with_one(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "pi4-4gb")
    with pytest.raises(ConfigError, match="hub address is needed: pass --hub"):
        run_setup(_options(tmp_path, root, "worker-ollama"))

    asked: list[tuple[str, bool]] = []

    def ask(name: str, secret: bool) -> str:
        asked.append((name, secret))
        return {"hub address": "10.0.0.2:7500"}.get(name, "typed-leaf-password")

    run_setup(_options(tmp_path, root, "worker-ollama", interactive=True), ask)
    assert asked == [("hub address", False), ("the hub's D8_LEAF_PASSWORD", True)]
    values = read_env(tmp_path / "worker-ollama.env")
    assert values["D8_HUB_LEAF_URL"] == "nats-leaf://leaf:typed-leaf-password@10.0.0.2:7500"


def test_cloud_worker_setup_needs_its_key(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "x86-server")
    given = {"D8_WORKER_PASSWORD": "worker-password-from-the-hub"}
    with pytest.raises(ConfigError, match="GROQ_API_KEY is needed"):
        run_setup(_options(tmp_path, root, "worker-groq", hub="hub.lan", given=given))
    given["GROQ_API_KEY"] = "gsk_test"
    run_setup(_options(tmp_path, root, "worker-groq", hub="hub.lan", given=given))
    values = read_env(tmp_path / "worker-groq.env")
    assert values["D8_HUB_URL"] == "nats://hub.lan:4222"
    assert values["GROQ_API_KEY"] == "gsk_test"


def test_systemd_unit_is_installed_once(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "pi4-8gb")
    options = _options(tmp_path, root, "hub", systemd=True)
    report = run_setup(options)
    unit = root / "etc/systemd/system/d8-mesh.service"
    assert report.unit_file == unit
    assert f"WorkingDirectory={ROOT}" in unit.read_text()
    assert not [n for n in run_setup(options).notes if "unit" in n], "a re-run leaves it alone"


def test_start_runs_compose_through_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_root(tmp_path, "x86-server")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match="docker is not installed"):
        run_setup(_options(tmp_path, root, "hub", start=True))

    # A stand-in docker CLI that records what it is asked to do.
    calls = tmp_path / "docker-calls"
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    docker.chmod(0o755)
    report = run_setup(_options(tmp_path, root, "hub", start=True))
    env_file = tmp_path / "hub.env"
    assert report.commands == [
        [
            "docker",
            "compose",
            "-f",
            str(ROOT / "compose.yaml"),
            "--env-file",
            str(env_file),
            "up",
            "-d",
        ]
    ]
    assert calls.read_text().splitlines()[-1].startswith("compose -f ")


def test_a_start_that_fails_or_outlasts_its_limit_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_root(tmp_path, "pi4-8gb")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    # `docker info` and `compose version` answer; `compose ... up` fails with exit code 3.
    docker = bin_dir / "docker"
    docker.write_text('#!/bin/sh\ncase "$*" in *" up -d") exit 3;; esac\n')
    docker.chmod(0o755)
    given = {"D8_LEAF_PASSWORD": "leaf-secret-0123456789"}
    options = _options(tmp_path, root, "worker-ollama", hub="hub.lan", given=given, start=True)
    with pytest.raises(ConfigError, match=r"up -d` failed with exit code 3: its output is above"):
        run_setup(options)

    def outlasting(command: list[str]) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(command, 14400)

    with pytest.raises(ConfigError, match=r"still running after 4 h .* logs ollama-pull"):
        run_setup(options, start=outlasting)


def test_cli_prints_no_secret(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "pi4-4gb")
    env_file = tmp_path / "cli.env"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "setup",
            "worker-ollama",
            "--yes",
            "--no-start",
            "--hub",
            "hub.lan",
            "--root",
            str(root),
            "--project-dir",
            str(ROOT),
            "--env-file",
            str(env_file),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "D8_LEAF_PASSWORD": "leaf-secret-0123456789"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "model: deepseek-coder:1.3b" in result.stdout
    for secret in ("leaf-secret-0123456789", read_env(env_file)["D8_WORKER_PASSWORD"]):
        assert secret not in result.stdout + result.stderr


def test_all_in_one_links_everything_to_the_local_hub(tmp_path: Path) -> None:
    report = run_setup(_options(tmp_path, fake_root(tmp_path, "pi4-8gb"), "all"))
    values = read_env(tmp_path / "all.env")
    leaf_password = values["D8_LEAF_PASSWORD"]
    assert values["D8_HUB_LEAF_URL"] == f"nats-leaf://leaf:{leaf_password}@nats-hub:7422"
    assert values["D8_HUB_URL"] == "nats://nats-hub:4222"
    assert values["D8_OLLAMA_MODEL"] == "deepseek-coder:6.7b"
    assert "no GROQ_API_KEY: its worker will stop with a config error" in report.notes
    # The template's comments survive the merge.
    assert "# Optional here: a cloud worker without its key" in (tmp_path / "all.env").read_text()
