"""`python -m bench --tiny`: the benchmark still runs end to end and writes sound results."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.helpers import ROOT

if TYPE_CHECKING:
    from pathlib import Path

SECTIONS = "throughput,latency,llm,memory"


def test_the_tiny_bench_runs_and_reports_every_section(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--tiny",
            "--no-plot",
            "--sections",
            SECTIONS,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads((tmp_path / "latest.json").read_text())

    throughput = results["throughput"]
    assert throughput["raw"]["all_ok"] and throughput["mesh"]["all_ok"]
    assert throughput["mesh"]["tasks_per_s"] > 0
    assert throughput["ratio_median"] > 0
    assert results["latency"]["mesh"]["p50_ms"] > 0

    llm = results["llm"]
    assert llm["mesh"]["p50_ms"] >= llm["server_delay_ms"]
    assert llm["ollama_worker_rss_mb"] > 0

    memory = results["memory"]
    assert memory["echo_worker_imports"]["sdk_modules_loaded"] == []
    assert memory["echo_worker_rss_mb"] > 0
    assert "| d8-mesh (full path) |" in completed.stdout
