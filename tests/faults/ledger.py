"""Counting what became of submitted tasks, from JetStream itself and from worker logs.

A fault test ends with `ledger = await read_ledger(...)` and `ledger.check(...)`:

- every submitted task has exactly one stored result (`submitted = ok + dead + expired +
  error`, `lost = 0`), and the `results` bucket accepted exactly one write per task (its
  stream's last sequence equals the number of tasks, so no result was ever overwritten);
- nothing is left in `TASKS`;
- runs beyond the first (from the workers' one-line-per-task logs) are counted, and the
  test says what explains them (a killed worker's in-flight tasks, say) by bounding them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from mesh.results import get_result
from mesh.topology import DEAD_STREAM, RESULTS_BUCKET, TASKS_STREAM

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nats.js import JetStreamContext

    from mesh.contract import Result

__all__ = ["Ledger", "read_ledger", "runs_in_logs"]

# The worker's per-task line: `task <status> task_id=<id> attempt=<n> worker_id=<w>`.
_TASK_LINE = re.compile(
    r"task (ok|late|expired|error|dead|duplicate|retry|returned) task_id=(\S+) attempt=(\d+)"
)
# Statuses that mean the backend ran the task to an answer (or to its deadline); `late`
# is a run whose result lost the create-once race to another attempt.
_RAN = {"ok", "late", "expired"}


def runs_in_logs(logs: Iterable[str]) -> Counter[str]:
    """How many times each task id ran to an answer, over all the given worker logs."""
    runs: Counter[str] = Counter()
    for text in logs:
        for status, task_id, _attempt in _TASK_LINE.findall(text):
            if status in _RAN:
                runs[task_id] += 1
    return runs


@dataclass
class Ledger:
    """What became of a set of submitted tasks."""

    submitted: int
    statuses: Counter[str]
    lost: list[str]
    results: dict[str, Result]
    result_writes: int
    tasks_left: int
    dead_letters: int
    runs: Counter[str] = field(default_factory=Counter)

    @property
    def completed(self) -> int:
        return self.statuses["ok"]

    @property
    def extra_runs(self) -> int:
        """Runs beyond the first, over all tasks: the work done twice."""
        return sum(max(0, count - 1) for count in self.runs.values())

    @property
    def redelivered(self) -> int:
        """Tasks whose stored result came from a second or later delivery."""
        return sum(1 for r in self.results.values() if r.attempt > 1)

    def summary(self) -> str:
        counts = " ".join(f"{status}={n}" for status, n in sorted(self.statuses.items()))
        return (
            f"submitted={self.submitted} {counts} lost={len(self.lost)} "
            f"result_writes={self.result_writes} tasks_left={self.tasks_left} "
            f"dead_letters={self.dead_letters} redelivered={self.redelivered} "
            f"extra_runs={self.extra_runs}"
        )

    def check(self, *, max_extra_runs: int = 0, dead_letters: int | None = None) -> None:
        """Assert the invariants; `max_extra_runs` is what the fault can explain."""
        summary = self.summary()
        assert not self.lost, f"lost tasks {self.lost[:10]}: {summary}"
        assert sum(self.statuses.values()) == self.submitted, summary
        assert self.result_writes == self.submitted, f"a result was written twice: {summary}"
        assert self.tasks_left == 0, f"tasks left in {TASKS_STREAM}: {summary}"
        assert self.extra_runs <= max_extra_runs, (
            f"more repeated runs than the fault explains: {summary}"
        )
        if dead_letters is not None:
            assert self.dead_letters == dead_letters, summary


async def read_ledger(
    js: JetStreamContext, task_ids: Iterable[str], logs: Iterable[str] = ()
) -> Ledger:
    """Read the results of `task_ids` and the streams' counts back from JetStream."""
    ids = list(task_ids)
    results: dict[str, Result] = {}

    async def fetch(chunk: list[str]) -> None:
        for task_id in chunk:
            result = await get_result(js, task_id)
            if result is not None:
                results[task_id] = result

    async with anyio.create_task_group() as group:
        for start in range(16):
            group.start_soon(fetch, ids[start::16])

    bucket = await js.stream_info(f"KV_{RESULTS_BUCKET}")
    tasks = await js.stream_info(TASKS_STREAM)
    dead = await js.stream_info(DEAD_STREAM)
    return Ledger(
        submitted=len(ids),
        statuses=Counter(r.status for r in results.values()),
        lost=[task_id for task_id in ids if task_id not in results],
        results=results,
        result_writes=bucket.state.last_seq,
        tasks_left=tasks.state.messages,
        dead_letters=dead.state.messages,
        runs=runs_in_logs(logs),
    )
