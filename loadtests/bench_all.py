"""`make bench`: run every benchmark and rewrite docs/benchmarks.md from their JSON lines.

    python -m loadtests.bench_all [--only codec,ledger,gateway] [--output docs/benchmarks.md]

Each benchmark (loadtests.bench_codec, bench_ledger, bench_gateway; those whose module exists)
runs as its own process, one after the other so none disturbs another's figures. The last line
each prints is one JSON object; the page is rendered from those objects alone: date, machine
(CPU cores and model, memory, kernel, Python, PostgreSQL), a summary of every target, then per
benchmark its command, every figure, every ratio to its in-run reference and the raw JSON. A
benchmark that fails is named on the page with its exit status, and `make bench` then exits 1.
The page is generated: edit this module, not the page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUTPUT_DEFAULT = REPO / "docs" / "benchmarks.md"
BENCHMARKS = ("codec", "ledger", "gateway")
benchmark_timeout_s = 45 * 60
stderr_tail_lines = 15


@dataclass
class Outcome:
    name: str
    command: str
    exit_code: int | None
    seconds: float
    figures: dict[str, Any] | None
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.figures is not None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def module_exists(name: str) -> bool:
    return (Path(__file__).resolve().parent / f"bench_{name}.py").exists()


def last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def run_benchmark(name: str) -> Outcome:
    module = f"loadtests.bench_{name}"
    command = [sys.executable, "-m", module]
    shown = f"python -m {module}"
    log(f"== {shown}")
    started = time.perf_counter()
    stderr_lines: list[str] = []
    try:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = process.communicate(timeout=benchmark_timeout_s)
        exit_code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        exit_code = None
    stderr_lines = stderr.splitlines()
    for line in stderr_lines:
        log(f"   {line}")
    figures = last_json_line(stdout)
    return Outcome(name=name, command=shown, exit_code=exit_code, seconds=round(time.perf_counter() - started, 1),
                   figures=figures, stderr_tail=stderr_lines[-stderr_tail_lines:])


# -- the machine ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "kernel": f"{platform.system()} {platform.release()}",
                            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["postgresql"] = postgres_version()
    return info


def postgres_version() -> str | None:
    try:
        from gateway.pgcluster import binaries_dir

        output = subprocess.run([str(binaries_dir() / "postgres"), "--version"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
    except Exception:
        return None
    match = re.search(r"(\d+(?:\.\d+)+)", output)
    return match.group(1) if match else None


# -- rendering --------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, scalar) for every figure; lists of records are left to tables()."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            return
        yield prefix, ", ".join(str(item) for item in value) if value else "-"
    else:
        yield prefix, value


def tables(value: Any, prefix: str = "") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(dotted name, rows) for every list of records (per-case or per-phase results)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from tables(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        yield prefix, value


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def target_rows(outcome: Outcome) -> list[tuple[str, str, str, str]]:
    """(target, required, measured, met) rows of one benchmark's JSON."""
    figures = outcome.figures or {}
    rows = []
    targets = figures.get("targets")
    if isinstance(targets, dict):
        for name, entry in targets.items():
            if not isinstance(entry, dict):
                continue
            measured = entry.get("ratio", entry.get("value"))
            is_ratio = "ratio" in entry
            required = f">= {cell(entry.get('target'))} x" if is_ratio else f"<= {cell(entry.get('target'))}"
            rows.append((f"{outcome.name}: {name}", required, cell(measured), cell(entry.get("met"))))
    for key, required in figures.items():
        if key.startswith("target_") and key[len("target_"):] in figures:
            measured_key = key[len("target_"):]
            rows.append((f"{outcome.name}: {measured_key}", f"<= {cell(required)}", cell(figures[measured_key]),
                         cell(figures.get("meets_target"))))
    return rows


def render(outcomes: list[Outcome], host: dict[str, Any], when: datetime, command: str) -> str:
    lines = [
        "# vendgate benchmarks",
        "",
        f"Generated by `{command}` on {when.strftime('%Y-%m-%d %H:%M UTC')}; every figure below comes from that one"
        " run. This page is rewritten by `make bench` (loadtests/bench_all.py): do not edit it by hand.",
        "Each benchmark measures its own reference in the same run on the same machine, so the ratios",
        "carry over between machines better than the absolute figures do.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU cores | {cell(host.get('cpu_cores'))} |",
        f"| CPU model | {cell(host.get('cpu_model'))} |",
        f"| Memory | {cell(host.get('memory_gib'))} GiB |",
        f"| Kernel | {cell(host.get('kernel'))} |",
        f"| Python | {cell(host.get('python'))} |",
        f"| PostgreSQL | {cell(host.get('postgresql'))} |",
        "",
        "## Targets",
        "",
        "| Target | Required | Measured | Met |",
        "| --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        if not outcome.ok:
            lines.append(f"| {outcome.name}: the benchmark failed (exit {cell(outcome.exit_code)}) | - | - | no |")
        lines.extend(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_rows(outcome))
    for outcome in outcomes:
        lines.extend(["", f"## {outcome.name}", "", f"Command: `{outcome.command}` ({cell(outcome.seconds)} s)", ""])
        if not outcome.ok:
            lines.append(f"**Failed**: exit status {cell(outcome.exit_code)}, no JSON line. Last lines of stderr:")
            lines.extend(["", "```", *outcome.stderr_tail, "```"])
            continue
        figures = outcome.figures or {}
        ratios = [(name, value) for name, value in flatten(figures) if "ratio" in name.split(".")[-1]
                  or name.startswith("ratios.")]
        if ratios:
            lines.extend(["Ratios to the in-run reference:", "", "| Ratio | Value |", "| --- | --- |"])
            lines.extend(f"| {name} | {cell(value)} |" for name, value in ratios)
            lines.append("")
        if "reference" in figures:
            lines.extend([f"Reference: {figures['reference']}", ""])
        lines.extend(["Every figure:", "", "| Figure | Value |", "| --- | --- |"])
        lines.extend(f"| {name} | {cell(value)} |" for name, value in flatten(figures))
        for name, rows in tables(figures):
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines.extend(["", f"{name}:", "", "| " + " | ".join(columns) + " |",
                          "| " + " | ".join("---" for _ in columns) + " |"])
            lines.extend("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)
        lines.extend(["", "<details><summary>JSON line</summary>", "", "```json", json.dumps(figures), "```", "",
                      "</details>"])
    lines.extend([
        "",
        "## Other load runs",
        "",
        "Not part of `make bench` (they take minutes and are read differently); see loadtests/README.md:",
        "",
        "- `make loadtest`: headless locust, 200 POS + 20 kiosk users for 60 s against a local `vendgate serve`"
        " (or `VENDGATE_TARGET`), CSV and HTML reports under loadtests/reports/.",
        "- `python -m loadtests.soak --minutes N`: 2,000 mostly idle logged-on terminals; RSS per session,"
        " latency drift, ledger check.",
        "",
    ])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_all", description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
                        default=list(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=OUTPUT_DEFAULT)
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    when = datetime.now(UTC)
    outcomes = [run_benchmark(name) for name in BENCHMARKS if name in args.only and module_exists(name)]
    command = "make bench" if argv is None and sys.argv[1:] == [] else "python -m loadtests.bench_all " + " ".join(
        sys.argv[1:] if argv is None else argv)
    page = render(outcomes, machine(), when, command.strip())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    summary = {
        "benchmark": "bench_all", "output": str(args.output), "date": when.isoformat(timespec="seconds"),
        "benchmarks": {o.name: {"exit_code": o.exit_code, "seconds": o.seconds, "json": o.figures is not None}
                       for o in outcomes},
        "targets": [{"target": a, "required": b, "measured": c, "met": d} for o in outcomes
                    for a, b, c, d in target_rows(o)],
    }
    log(f"wrote {args.output}")
    print(json.dumps(summary), flush=True)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
