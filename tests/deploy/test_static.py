"""Static checks of the deployment files: compose schema and profiles, linters, units.

No Docker engine runs here, so compose.yaml is validated against the Compose
Specification's JSON Schema (the copy vendored by check-jsonschema, from
github.com/compose-spec/compose-spec, schema/compose-spec.json) and read as data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from jsonschema import Draft7Validator

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)

COMPOSE = ROOT / "compose.yaml"
ENV_DIR = ROOT / "deploy" / "env"
D8_IMAGE_SERVICES = {
    "nats-hub",
    "orchestrator",
    "nats-leaf",
    "worker-ollama",
    "worker-groq",
    "worker-gemini",
}
PROFILES = {
    "hub": {"nats-hub", "orchestrator"},
    "worker-ollama": {"nats-leaf", "ollama", "ollama-pull", "worker-ollama"},
    "worker-groq": {"worker-groq"},
    "worker-gemini": {"worker-gemini"},
}
PROFILES["all"] = set().union(*PROFILES.values())


def _tool(name: str) -> str:
    found = Path(sysconfig.get_path("scripts")) / name
    if found.is_file():
        return str(found)
    path = shutil.which(name)
    assert path, f"{name} is missing: pip install -e '.[dev]'"
    return path


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = Draft7Validator(get_builtin_schema("vendor.compose-spec"))
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_each_profile_names_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    found: dict[str, set[str]] = {}
    for name, service in services.items():
        assert service.get("profiles"), f"{name} runs in every profile: give it one"
        for profile in service["profiles"]:
            found.setdefault(profile, set()).add(name)
    assert found == PROFILES


def test_services_are_healthchecked_restarted_and_limited(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "ollama-pull":
            assert service["restart"] == "no"  # a one-shot job
            continue
        assert "healthcheck" in service, name
        assert service["restart"] == "unless-stopped", name
        assert service["deploy"]["resources"]["limits"]["memory"], name
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"].startswith("service_"), name


def test_d8_services_run_hardened_and_hold_no_secret(compose: dict[str, Any]) -> None:
    for name in D8_IMAGE_SERVICES:
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|API_KEY", key):
                # Interpolated from .env at run time, never written into the file.
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:-\}", str(value)), f"{name} {key}={value}"


def test_worker_inbox_prefix_matches_its_permission(compose: dict[str, Any]) -> None:
    permissions = (ROOT / "deploy/nats/permissions.conf").read_text()
    for name in ("worker-ollama", "worker-groq", "worker-gemini"):
        prefix = compose["services"][name]["environment"]["NATS_INBOX_PREFIX"]
        assert f'subscribe: {{ allow: ["{prefix}.>"] }}' in permissions, name
    orchestrator = compose["services"]["orchestrator"]["environment"]["NATS_INBOX_PREFIX"]
    assert f'"{orchestrator}.>"' in permissions


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_env_template_sets_what_the_profile_reads(compose: dict[str, Any], profile: str) -> None:
    template = (ENV_DIR / f"{profile}.env.example").read_text()
    keys = set(re.findall(r"^([A-Z0-9_]+)=", template, re.MULTILINE))
    assert f"COMPOSE_PROFILES={profile}" in template
    for name in PROFILES[profile]:
        text = yaml.safe_dump(compose["services"][name])
        for variable in re.findall(r"\$\{([A-Z0-9_]+):-\}", text):
            assert variable in keys, f"{profile}: {name} reads {variable}, missing from template"
    # Templates ship empty secrets: d8 setup fills them in.
    for line in template.splitlines():
        if re.match(r"^[A-Z0-9_]*(PASSWORD|API_KEY)=", line):
            assert line.endswith("="), line


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(ROOT / "docker/Dockerfile")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_unprivileged_and_checks_health() -> None:
    text = (ROOT / "docker/Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage build"
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and '["d8", "health"]' in text
    assert not re.search(r"(PASSWORD|API_KEY)\s*=", text), "no secret in the image"


def test_dockerignore_keeps_secrets_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines, "allow-list style: everything out, then what the image needs"
    assert "**/.env" in lines
    assert "**/*.env" in lines


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted([*ROOT.glob("docker/*.sh"), *ROOT.glob("deploy/**/*.sh")])
    assert scripts
    result = subprocess.run(
        [_tool("shellcheck"), "--severity=style", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Complaints that only mean the unit's programs are not installed on this machine.
_ABSENT = re.compile(r"is not executable: No such file|Unit docker\.service not found")


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = []
    for unit in sorted((ROOT / "deploy/systemd").glob("*.service")):
        # Templates are verified as one instance each.
        target = tmp_path / unit.name.replace("@.", "@test.")
        target.write_text(unit.read_text())
        units.append(str(target))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if line and not _ABSENT.search(line)]
    assert not problems, "\n".join(problems)
