"""Turning a run's results into a table, a JSON file, a plot, and the block in the docs."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mesh.server import find_server_binary

__all__ = ["machine", "plot", "table", "targets", "update_docs", "write_json"]

DOCS_START = "<!-- bench:results:start -->"
DOCS_END = "<!-- bench:results:end -->"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import subprocess

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server = subprocess.run(
        [find_server_binary(), "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nats_server": server,
        "nats_py": metadata.version("nats-py"),
        "msgspec": metadata.version("msgspec"),
    }


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    """Write the run as `run-<time>.json` and `latest.json`; return the former."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(results, indent=1, sort_keys=True)
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_us_per_task", {})
    return " / ".join(_fmt(cpu.get(k)) for k in ("worker", "server", "producer"))


def _versus_rows(results: dict[str, Any]) -> list[str]:
    tp, lat = results.get("throughput", {}), results.get("latency", {})
    rows = []
    for name, label in (("raw", "raw nats-py JetStream"), ("mesh", "d8-mesh (full path)")):
        t, lt = tp.get(name, {}), lat.get(name, {})
        ratio = "1.00" if name == "raw" else _fmt(tp.get("ratio_median"), 2)
        rows.append(
            f"| {label} | {_fmt(t.get('tasks_per_s'))} | {ratio} | {_fmt(lt.get('p50_ms'), 2)} "
            f"| {_fmt(lt.get('p99_ms'), 2)} | {_cpu(t)} | {_fmt(t.get('worker_peak_rss_mb'), 1)} |"
        )
    return rows


#: Peer section keys and their labels in the table, in the order they are shown.
PEER_LABELS = {
    "taskiq-nats": "taskiq + taskiq-nats (pull JetStream)",
    "faststream-nats": "FastStream NATS (JetStream pull)",
    "celery-redis": "Celery + Redis (acks_late)",
}


def _peer_rows(peers: dict[str, Any]) -> list[str]:
    """Table rows of the peers section: its own raw baseline, then each peer that ran."""
    raw = peers.get("raw")
    if not raw:
        return []
    rows = [
        f"| raw nats-py JetStream (peers section) | {_fmt(raw.get('tasks_per_s'))} | 1.00 "
        f"| {_fmt(raw.get('p50_ms'), 2)} | {_fmt(raw.get('p99_ms'), 2)} | {_cpu(raw)} "
        f"| {_fmt(raw.get('worker_peak_rss_mb'), 1)} |"
    ]
    for name, label in PEER_LABELS.items():
        row = peers.get(name, {})
        if "skipped" in row or not row.get("throughput_runs"):
            continue
        rows.append(
            f"| {label} | {_fmt(row.get('tasks_per_s'))} | {_fmt(row.get('ratio_median'), 2)} "
            f"| {_fmt(row.get('p50_ms'), 2)} | {_fmt(row.get('p99_ms'), 2)} | {_cpu(row)} "
            f"| {_fmt(row.get('worker_peak_rss_mb'), 1)} |"
        )
    return rows


def _peer_lines(peers: dict[str, Any]) -> list[str]:
    """Notes under the table: per-pair ratios, skips and failures of the peers section."""
    lines = []
    for name in PEER_LABELS:
        row = peers.get(name)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"- Peer {name} skipped: {row['skipped']}")
            continue
        if row.get("ratios"):
            lines.append(
                f"- Peer {name}: tasks/s ratio to raw per round {row['ratios']}, p50 "
                f"{_fmt(row.get('p50_ratio_median'), 2)} x raw's; versions "
                + ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
            )
        if name == "taskiq-nats" and row.get("worker_tree_peak_rss_mb"):
            lines.append(
                f"- taskiq's RSS is its forked worker's; with its supervisor "
                f"{_fmt(row['worker_tree_peak_rss_mb'], 1)} MB"
            )
        if row.get("latency_skipped"):
            lines.append(f"- Peer {name} latency not measured: {row['latency_skipped']}")
        if row.get("error"):
            lines.append(f"- Peer {name} failed: {row['error']}")
        elif not row.get("all_ok", True):
            lines.append(f"- Peer {name}: some runs lost, duplicated or left tasks unacked")
    return lines


def _target_rows(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    tp, lat, llm = results.get("throughput", {}), results.get("latency", {}), results.get("llm", {})
    memory, start, scale = (
        results.get("memory", {}),
        results.get("startup", {}),
        results.get("scale", {}),
    )
    rows: list[tuple[str, str, bool | None]] = []
    if tp.get("ratio_median") is not None:
        rows.append(
            ("throughput >= 0.5 x raw", f"{tp['ratio_median']:.2f} x", tp["ratio_median"] >= 0.5)
        )
    mesh_lat = lat.get("mesh", {})
    if mesh_lat.get("p50_ms") is not None:
        rows.append(
            ("p50 <= 1.5 ms at 500/s", f"{mesh_lat['p50_ms']:.2f} ms", mesh_lat["p50_ms"] <= 1.5)
        )
        rows.append(
            ("p99 <= 3 ms at 500/s", f"{mesh_lat['p99_ms']:.2f} ms", mesh_lat["p99_ms"] <= 3.0)
        )
    if "added_p50_ms" in llm:
        rows.append(
            (
                "adds <= 2 ms p50 to a 50 ms LLM call",
                f"{llm['added_p50_ms']:.2f} ms",
                llm["added_p50_ms"] <= 2.0,
            )
        )
    if "echo_worker_rss_mb" in memory:
        sdk = memory["echo_worker_imports"]["sdk_modules_loaded"]
        rss = memory["echo_worker_rss_mb"]
        rows.append(
            (
                "idle echo worker <= 45 MB, no SDK imported",
                f"{rss} MB, SDKs: {', '.join(sdk) or 'none'}",
                rss <= 45 and not sdk,
            )
        )
    backlog = memory.get("backlog", {})
    if "rss_while_waiting_mb" in backlog:
        grew = backlog["rss_while_waiting_mb"]["worker"] - backlog["rss_before_mb"]["worker"]
        rows.append(
            (
                f"worker memory flat, {backlog['waiting_in_stream']:,} waiting",
                f"+{grew:.1f} MB",
                grew < 5,
            )
        )
    if "seconds_to_first_result" in start:
        rows.append(
            (
                "`d8 up` to first result <= 2 s",
                f"{start['seconds_to_first_result']:.2f} s",
                start["seconds_to_first_result"] <= 2,
            )
        )
    counts = sorted((k for k, v in scale.items() if isinstance(v, dict)), key=int)
    if counts:
        best = max(scale[k]["tasks_per_s"] or 0 for k in counts)
        last = scale[counts[-1]]["tasks_per_s"] or 0
        rows.append(
            (
                f"{counts[-1]} workers share a capability, no collapse",
                f"{last / best:.0%} of the best count",
                last >= 0.5 * best,
            )
        )
    return rows


def targets(results: dict[str, Any]) -> str:
    """The issue's targets against this run, as a markdown table."""
    lines = ["| target | this run | met |", "| --- | ---: | :---: |"]
    for name, value, met in _target_rows(results):
        lines.append(f"| {name} | {value} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """The results as markdown: the head-to-head table, then one line per other figure."""
    lines = [
        "| system | tasks/s | x raw | p50 ms at 500/s | p99 ms | CPU us/task worker / server "
        "/ producer | worker peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *_versus_rows(results),
        *_peer_rows(results.get("peers", {})),
        "",
    ]
    tp = results.get("throughput", {})
    if tp.get("ratios"):
        lines.append(f"- Throughput ratio mesh/raw per interleaved pair: {tp['ratios']}")
    lat = results.get("latency", {})
    if lat.get("ratios"):
        lines.append(f"- p50 latency ratio mesh/raw per pair: {lat['ratios']}")
    log = results.get("log_cost", {})
    if "info_line_us" in log:
        lines.append(
            f"- Per-task INFO log line: worker {_fmt(log['worker_cpu_us_per_task']['warning'])} "
            f"us/task at warning, {_fmt(log['worker_cpu_us_per_task']['info'])} at info "
            f"({_fmt(log['info_line_us'])} us per line); tasks/s {log['tasks_per_s']}"
        )
    llm = results.get("llm", {})
    if "added_p50_ms" in llm:
        lines.append(
            f"- LLM call ({_fmt(llm['server_delay_ms'])} ms server, {llm['calls']} calls each): "
            f"direct p50 {_fmt(llm['direct']['p50_ms'], 2)} ms, through the mesh "
            f"{_fmt(llm['mesh']['p50_ms'], 2)} ms: mesh adds {_fmt(llm['added_p50_ms'], 2)} ms "
            f"at p50 ({_fmt(llm['added_mean_ms'], 2)} ms mean); Ollama worker RSS "
            f"{_fmt(llm['ollama_worker_rss_mb'], 1)} MB"
        )
        stages = llm.get("mesh_stages_p50_ms", {})
        if stages:
            shown = ", ".join(
                f"{name.replace('_', ' ')} {value:.2f}" for name, value in stages.items()
            )
            lines.append(f"- Where the mesh's share of an LLM call goes (p50 ms): {shown}")
    lines.extend(_peer_lines(results.get("peers", {})))
    lines.extend(_memory_lines(results.get("memory", {})))
    start = results.get("startup", {})
    if "seconds_to_first_result" in start:
        lines.append(
            f"- `d8 up` to first result: {_fmt(start['seconds_to_first_result'], 2)} s "
            f"(HTTP API answering after {_fmt(start['seconds_to_http_answer'], 2)} s)"
        )
    scale = results.get("scale", {})
    if scale and "error" not in scale:
        shown = ", ".join(
            f"{k} -> {_fmt(scale[k]['tasks_per_s'])}"
            for k in sorted((k for k, v in scale.items() if isinstance(v, dict)), key=int)
        )
        lines.append(f"- Worker processes -> mesh tasks/s: {shown}")
    deep = results.get("depth", {})
    if "256" in deep:
        lines.append(
            "- One echo worker at concurrency 64 (default) -> 256: "
            f"{_fmt(deep['default']['tasks_per_s'])} -> {_fmt(deep['256']['tasks_per_s'])} "
            "tasks/s, "
            f"CPU us/task {_cpu(deep['default'])} -> {_cpu(deep['256'])}"
        )
    lines.extend(_profile_lines(results.get("profile", {})))
    for name, section in results.items():
        if isinstance(section, dict) and "error" in section:
            lines.append(f"- Section {name} failed: {section['error']}")
    return "\n".join(lines)


def _profile_lines(profile: dict[str, Any], top: int = 14) -> list[str]:
    if "worker" not in profile:
        return [f"- Profile: {profile['skipped']}"] if "skipped" in profile else []
    lines = [
        "",
        f"Profile of one mesh throughput run ({profile['n']:,} tasks, py-spy, share of samples "
        "including callees; the run is slower while sampled):",
        "",
        "| echo worker | % | producer (orchestrator) | % |",
        "| --- | ---: | --- | ---: |",
    ]
    worker = list(profile["worker"]["inclusive_pct"].items())[:top]
    producer = list(profile["producer"]["inclusive_pct"].items())[:top]
    for index in range(max(len(worker), len(producer))):
        w = worker[index] if index < len(worker) else ("", "")
        p = producer[index] if index < len(producer) else ("", "")
        lines.append(f"| `{w[0]}` | {w[1]} | `{p[0]}` | {p[1]} |")
    return lines


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    if "echo_worker_rss_mb" not in memory:
        return []
    imports = memory["echo_worker_imports"]
    lines = [
        f"- Idle RSS: echo worker {_fmt(memory['echo_worker_rss_mb'], 1)} MB, `d8 orchestrator` "
        f"{_fmt(memory['orchestrator_rss_mb'], 1)} MB, nats-server "
        f"{_fmt(memory['server_rss_mb'], 1)} MB; backend SDKs imported by the echo worker: "
        f"{', '.join(imports['sdk_modules_loaded']) or 'none'} ({imports['modules']} modules)"
    ]
    backlog = memory.get("backlog", {})
    if "rss_while_waiting_mb" in backlog:
        before, during = backlog["rss_before_mb"], backlog["rss_while_waiting_mb"]
        lines.append(
            f"- With {backlog['waiting_in_stream']:,} tasks waiting: echo worker "
            f"{before['worker']} -> {during['worker']} MB, `d8 orchestrator` "
            f"{before['orchestrator']} -> {during['orchestrator']} MB, nats-server "
            f"{before['server']} -> {during['server']} MB"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """A PNG with throughput, latency and scaling; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tp, lat, scale = (
        results.get("throughput", {}),
        results.get("latency", {}),
        results.get("scale", {}),
    )
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = ["raw JetStream", "d8-mesh"]
    axes[0].bar(
        names,
        [tp.get(k, {}).get("tasks_per_s") or 0 for k in ("raw", "mesh")],
        color=["#999", "#1f77b4"],
    )
    axes[0].set_title("throughput, no-op tasks (median)")
    axes[0].set_ylabel("tasks/s")
    for index, key in enumerate(("p50_ms", "p99_ms")):
        values = [lat.get(k, {}).get(key) or 0 for k in ("raw", "mesh")]
        axes[1].bar([x + index * 0.4 for x in range(2)], values, width=0.4, label=key.split("_")[0])
    axes[1].set_xticks([0.2, 1.2], names)
    axes[1].set_title(
        f"latency at {_fmt((lat.get('mesh_runs') or [{}])[0].get('offered_rate'))} tasks/s"
    )
    axes[1].set_ylabel("ms, enqueue to result observed")
    axes[1].legend()
    counts = sorted((k for k, v in scale.items() if isinstance(v, dict)), key=int)
    axes[2].plot(counts, [scale[k]["tasks_per_s"] or 0 for k in counts], marker="o")
    axes[2].set_title("d8-mesh tasks/s by worker processes")
    axes[2].set_xlabel("worker processes")
    axes[2].set_ylabel("tasks/s")
    axes[2].set_ylim(bottom=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def update_docs(doc: Path, block: str) -> bool:
    """Replace the generated block between the markers in `doc`; False when they are missing."""
    if not doc.exists():
        return False
    text = doc.read_text()
    pattern = re.compile(re.escape(DOCS_START) + ".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(text):
        return False
    doc.write_text(pattern.sub(lambda _: f"{DOCS_START}\n{block}\n{DOCS_END}", text))
    return True
