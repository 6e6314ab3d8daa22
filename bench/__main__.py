"""`python -m bench` (`make bench`): d8-mesh against raw nats-py JetStream, in one run.

Prints a markdown table with ratios, writes `bench/results/run-<time>.json` and
`latest.json`, and a plot `bench/results/benchmarks.png`. With `--write-docs`, the plot and
the table also go into `docs/` (the block between the markers in docs/benchmarks.md).
`--tiny` runs a few hundred tasks per section, to check that the bench works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import report
from bench.common import ROOT
from bench.suite import SECTIONS, Sizes, run_suite

__all__ = ["main"]

DEFAULT_SECTIONS = [name for name in SECTIONS if name != "peers"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few hundred tasks per section")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, from: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--peers", action="store_true", help="also run taskiq-nats, FastStream, Celery"
    )
    parser.add_argument("--reps", type=int, default=None, help="raw/mesh pairs per section")
    parser.add_argument("--n", type=int, default=None, help="tasks per throughput run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.{md,png}")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="measure nothing: report a saved run's JSON"
    )
    return parser


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    if args.peers and "peers" not in names:
        names.append("peers")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    sizes = Sizes.tiny() if args.tiny else Sizes()
    if args.reps:
        sizes = replace(sizes, reps=args.reps)
    if args.n:
        sizes = replace(sizes, throughput_n=args.n)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        path = args.from_json
    else:
        started = time.monotonic()
        results = {"machine": report.machine(), "sizes": vars(sizes) | {"tiny": args.tiny}}
        results.update(asyncio.run(run_suite(names, sizes, _say)))
        results["total_seconds"] = round(time.monotonic() - started, 1)
        path = report.write_json(results, args.out)
    text = report.table(results) + "\n\nTargets of issue #7:\n\n" + report.targets(results)
    print(text)
    _say(f"results: {path} ({results.get('total_seconds')} s in all)")
    if not args.no_plot:
        png = report.plot(results, args.out / "benchmarks.png")
        _say(
            f"plot: {png}" if png else "plot: skipped, matplotlib is not installed (extra `bench`)"
        )
        if png and args.write_docs:
            shutil.copyfile(png, ROOT / "docs" / "benchmarks.png")
    if args.write_docs:
        block = f"Measured {results['machine']['date_utc']} UTC by `make bench`:\n\n{text}"
        if not report.update_docs(ROOT / "docs" / "benchmarks.md", block):
            _say("docs/benchmarks.md has no result markers; not updated")
    failed = [name for name in names if "error" in results.get(name, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
