"""The deployment subcommands of `d8`: `d8 health` and `d8 setup`.

Kept apart from `mesh.cli` so the main command stays small; the modules doing the work
are imported only when their command runs.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

__all__ = ["add_deploy_commands"]

# Values `d8 setup` also takes from the environment, so secrets need not be typed as flags
# (where `ps` and the shell history would keep them).
_SETUP_VARIABLES = (
    "D8_LEAF_PASSWORD",
    "D8_WORKER_PASSWORD",
    "D8_ORCHESTRATOR_PASSWORD",
    "D8_CLIENT_PASSWORD",
    "GROQ_API_KEY",
    "GEMINI_API_KEY",
    "D8_GROQ_MODEL",
    "D8_GEMINI_MODEL",
)


def _say(line: str) -> None:
    print(line)


async def _cmd_health(args: argparse.Namespace) -> int:
    from mesh.health import options_from, run_checks

    options = options_from(args.role, args.worker_id)
    checks = await run_checks(options)
    for check in checks:
        _say(f"{'ok  ' if check.ok else 'FAIL'} {options.role} {check.name}: {check.detail}")
    return 0 if all(check.ok for check in checks) else 1


def _ask(name: str, secret: bool) -> str:
    prompt = f"{name}: "
    return getpass.getpass(prompt) if secret else input(prompt)


async def _cmd_setup(args: argparse.Namespace) -> int:
    import anyio

    # Setup reads files, asks questions and runs docker: all blocking, so off the loop.
    return await anyio.to_thread.run_sync(_setup, args)


def _setup(args: argparse.Namespace) -> int:
    from mesh.node_setup import SetupOptions, run_setup

    given = {name: os.environ[name] for name in _SETUP_VARIABLES if os.environ.get(name)}
    if args.leaf_password:
        given["D8_LEAF_PASSWORD"] = args.leaf_password
    if args.worker_password:
        given["D8_WORKER_PASSWORD"] = args.worker_password
    options = SetupOptions(
        profile=args.profile,
        project_dir=Path(os.path.abspath(args.project_dir)),
        env_file=Path(args.env_file) if args.env_file else None,
        root=Path(args.root),
        hub=args.hub,
        node_name=args.node_name,
        model=args.model,
        given=given,
        start=not args.no_start,
        systemd=args.systemd,
        interactive=not args.yes and sys.stdin.isatty(),
    )
    ask = _ask if options.interactive else None
    report = run_setup(options, ask)
    facts = report.facts
    if facts is not None:
        kind = facts.model or "not a Raspberry Pi"
        _say(f"host: {kind}, {facts.arch}, {facts.cpus} CPUs, {facts.mem_total_mb} MiB RAM")
    if report.model is not None:
        model = report.model
        _say(f"model: {model.name} ({model.reason}); Ollama memory limit {model.ollama_memory}")
    state = "written" if report.env_changed else "unchanged"
    _say(f"env: {report.env_file} {state} (mode 600; secrets are in it, not printed)")
    for note in report.notes:
        _say(note)
    for command in report.commands:
        _say(f"ran: {' '.join(command)}")
    if not report.commands:
        _say(f"next: docker compose --profile {args.profile} up -d")
    return 0


def add_deploy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `health` and `setup` on the `d8` command's subparsers."""
    health = commands.add_parser("health", help="container health check (exit 0 when healthy)")
    health.add_argument(
        "--role",
        choices=("worker", "orchestrator", "nats"),
        default=None,
        help="default: D8_ROLE, else the command of PID 1",
    )
    health.add_argument("--worker-id", default=None, help="default: D8_WORKER_ID")
    health.set_defaults(run=_cmd_health)

    from mesh.node_setup import PROFILES

    setup = commands.add_parser("setup", help="prepare this node: detect, pick a model, write .env")
    setup.add_argument("profile", choices=PROFILES)
    setup.add_argument("--hub", default=None, help="the hub's address, host or host:port")
    setup.add_argument("--node-name", default=None, help="default: the host name")
    setup.add_argument("--model", default=None, help="Ollama model (default: what fits the RAM)")
    setup.add_argument("--leaf-password", default=None, help="or D8_LEAF_PASSWORD (safer)")
    setup.add_argument("--worker-password", default=None, help="or D8_WORKER_PASSWORD (safer)")
    setup.add_argument("--project-dir", default=".", help="the d8-mesh checkout (compose.yaml)")
    setup.add_argument("--env-file", default=None, help="default: <project-dir>/.env")
    setup.add_argument("--root", default="/", help="read /proc and the device tree below this")
    setup.add_argument("--no-start", action="store_true", help="only write .env (and the unit)")
    setup.add_argument("--systemd", action="store_true", help="install d8-mesh.service")
    setup.add_argument(
        "--yes", "-y", action="store_true", help="never ask: fail on what is missing"
    )
    setup.set_defaults(run=_cmd_setup)
