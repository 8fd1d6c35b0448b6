"""`make loadtest`: headless locust against a local gateway started for the run, or VENDGATE_TARGET.

    python -m loadtests.run_locust [--pos-users 200] [--kiosk-users 20] [--duration-s 60]
                                   [--spawn-rate 50] [--fail-ratio-max 0.001] [--keep]

Without VENDGATE_TARGET it makes a data folder of its own (a temporary one), starts a durable
PostgreSQL cluster in it, migrates, seeds agents, one POS terminal per POS user, meters and one
kiosk (with a client certificate from a kiosk CA made for the run) per kiosk user, starts
`vendgate serve` on free loopback ports and writes the target file. With VENDGATE_TARGET it
only runs locust against that target. Either way locust writes its CSV and HTML reports under
loadtests/reports/ (loadtest_*.csv, loadtest.html). After a local run the gateway's mean batch
size is read from /metrics, the gateway is stopped and `ledger check` runs over what was paid.

The run fails (exit 1) when the failure ratio exceeds --fail-ratio-max, when locust itself fails
or when the ledger check finds a broken invariant. The last line printed is one JSON object.
Every option can also come from the environment (LOADTEST_POS_USERS, LOADTEST_KIOSK_USERS,
LOADTEST_DURATION_S, LOADTEST_SPAWN_RATE, LOADTEST_FAIL_RATIO_MAX), since make passes no arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.records_check import check_all
from loadtests.deployment import LocalDeployment, metric_sums
from loadtests.target import TARGET_ENV, load_target, save_target

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPORTS_DIR = Path(__file__).resolve().parent / "reports"
REPORT_PREFIX = "loadtest"
pos_users_default = 200
kiosk_users_default = 20
duration_s_default = 60
spawn_rate_default = 50.0
fail_ratio_max_default = 0.001
local_agents = 20
local_meters = 600
local_float_each_minor = 10**12
locust_timeout_s_extra = 180
users_max = 20_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env(name: str, default: float) -> Any:
    value = os.environ.get(name)
    return type(default)(value) if value else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run_locust", description=__doc__.splitlines()[0])
    parser.add_argument("--pos-users", type=int, default=_env("LOADTEST_POS_USERS", pos_users_default))
    parser.add_argument("--kiosk-users", type=int, default=_env("LOADTEST_KIOSK_USERS", kiosk_users_default))
    parser.add_argument("--duration-s", type=int, default=_env("LOADTEST_DURATION_S", duration_s_default))
    parser.add_argument("--spawn-rate", type=float, default=_env("LOADTEST_SPAWN_RATE", spawn_rate_default))
    parser.add_argument("--fail-ratio-max", type=float,
                        default=_env("LOADTEST_FAIL_RATIO_MAX", fail_ratio_max_default),
                        help="fail the run when failures / requests is above this")
    parser.add_argument("--reports-dir", type=Path, default=REPORTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the local data folder (printed) after the run")
    args = parser.parse_args(argv)
    if not 0 < args.pos_users + args.kiosk_users <= users_max or min(args.pos_users, args.kiosk_users) < 0:
        parser.error(f"between 1 and {users_max} users in all")
    if not 1 <= args.duration_s <= 86_400:
        parser.error("--duration-s must be 1..86400")
    return args


def locust_command(args: argparse.Namespace, reports_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.pos_users + args.kiosk_users), "-r", str(args.spawn_rate), "-t", f"{args.duration_s}s",
        "--pos-users", str(args.pos_users), "--kiosk-users", str(args.kiosk_users),
        "--csv", str(reports_dir / REPORT_PREFIX), "--html", str(reports_dir / f"{REPORT_PREFIX}.html"),
        "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]


def run_locust(args: argparse.Namespace, target_file: Path) -> int:
    args.reports_dir.mkdir(parents=True, exist_ok=True)
    command = locust_command(args, args.reports_dir)
    log(f"locust: {args.pos_users} POS + {args.kiosk_users} kiosk users for {args.duration_s} s")
    env = {**os.environ, TARGET_ENV: str(target_file)}
    try:
        completed = subprocess.run(command, env=env, cwd=REPO, timeout=args.duration_s + locust_timeout_s_extra,
                                   check=False)
    except subprocess.TimeoutExpired:
        log("locust did not finish in time")
        return 124
    return completed.returncode


def read_stats(reports_dir: Path) -> dict[str, Any]:
    """Totals, per-request figures and failure reasons from locust's CSV files."""
    stats_file = reports_dir / f"{REPORT_PREFIX}_stats.csv"
    requests: dict[str, dict[str, Any]] = {}
    total: dict[str, Any] = {}
    with stats_file.open(newline="") as handle:
        for row in csv.DictReader(handle):
            figures = {
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "requests_per_s": round(float(row["Requests/s"]), 1),
                "p50_ms": _number(row.get("50%")), "p99_ms": _number(row.get("99%")),
                "max_ms": _number(row.get("Max Response Time")),
            }
            if row["Name"] == "Aggregated":
                total = figures
            else:
                requests[f"{row['Type']} {row['Name']}"] = figures
    failures: list[dict[str, Any]] = []
    failures_file = reports_dir / f"{REPORT_PREFIX}_failures.csv"
    if failures_file.exists():
        with failures_file.open(newline="") as handle:
            failures = [{"request": f"{row['Method']} {row['Name']}", "error": row["Error"],
                         "occurrences": int(row["Occurrences"])} for row in csv.DictReader(handle)]
    return {"total": total, "requests": requests, "failures": failures}


def _number(text: str | None) -> float | None:
    if text is None or text in ("", "N/A"):
        return None
    return round(float(text), 1)


async def _prepare(deployment: LocalDeployment, args: argparse.Namespace) -> None:
    await deployment.start_database()
    population = await deployment.seed_population(agents=local_agents, terminals=max(1, args.pos_users),
                                                  meters=local_meters, float_each_minor=local_float_each_minor)
    kiosks = await deployment.add_kiosks(args.kiosk_users)
    deployment.start_gateway(log_level="warning")
    save_target(deployment.data_dir / "target.json", deployment.target(population, kiosks))


async def _ledger_check(deployment: LocalDeployment) -> dict[str, Any]:
    conn = await deployment.connect()
    try:
        report = await check_all(conn)
    finally:
        await conn.close()
    return {"holds": report.holds, "broken": report.broken, "transfers": report.transfers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary: dict[str, Any] = {"benchmark": "loadtest", "pos_users": args.pos_users,
                               "kiosk_users": args.kiosk_users, "duration_s": args.duration_s}
    deployment: LocalDeployment | None = None
    external = os.environ.get(TARGET_ENV)
    started = time.time()
    try:
        if external:
            target_file = Path(external)
            load_target(target_file)  # a bad file is reported before locust starts
            summary["target"] = "VENDGATE_TARGET"
        else:
            deployment = LocalDeployment(Path(tempfile.mkdtemp(prefix="vendgate-loadtest-")))
            log(f"local gateway: preparing {deployment.data_dir}")
            asyncio.run(_prepare(deployment, args))
            target_file = deployment.data_dir / "target.json"
            summary["target"] = "local vendgate serve"
        locust_exit = run_locust(args, target_file)
        summary["locust_exit_code"] = locust_exit
        if deployment is not None:
            metrics = deployment.http_get("/metrics") or ""
            batch_sum, batch_count = metric_sums(metrics, "vendgate_commit_batch_size")
            summary["mean_batch_size"] = round(batch_sum / batch_count, 2) if batch_count else None
            summary["batches"] = int(batch_count)
            summary["gateway_exit_code"] = deployment.stop_gateway()
            summary["ledger_check"] = asyncio.run(_ledger_check(deployment))
    finally:
        if deployment is not None:
            if args.keep:
                deployment.stop_gateway()
                deployment.cluster.stop()
                log(f"kept {deployment.data_dir}")
            else:
                deployment.destroy()
    stats = read_stats(args.reports_dir)
    total = stats["total"]
    ratio = total["failures"] / total["requests"] if total.get("requests") else 1.0
    summary.update({
        "requests": total.get("requests", 0), "failures": total.get("failures", 0),
        "failure_ratio": round(ratio, 6), "fail_ratio_max": args.fail_ratio_max,
        "requests_per_s": total.get("requests_per_s"), "p50_ms": total.get("p50_ms"), "p99_ms": total.get("p99_ms"),
        "by_request": stats["requests"], "failure_reasons": stats["failures"],
        "html_report": str(args.reports_dir / f"{REPORT_PREFIX}.html"),
        "csv_reports": str(args.reports_dir / f"{REPORT_PREFIX}_stats.csv"),
        "wall_s": round(time.time() - started, 1),
    })
    ledger_ok = summary.get("ledger_check", {"holds": True})["holds"]
    gateway_ok = summary.get("gateway_exit_code", 0) == 0  # a local gateway that failed, or outlived its stop bound
    passed = summary["locust_exit_code"] == 0 and ratio <= args.fail_ratio_max and ledger_ok and gateway_ok
    summary["passed"] = passed
    log(f"{summary['requests']} requests, {summary['failures']} failures (ratio {ratio:.4%}, max "
        f"{args.fail_ratio_max:.4%}); HTML report {summary['html_report']}")
    for failure in stats["failures"][:10]:
        log(f"  failure: {failure['request']}: {failure['error']} x{failure['occurrences']}")
    print(json.dumps(summary), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
