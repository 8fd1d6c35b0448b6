"""Figures the benchmarks compute, and what their exit status says."""

from __future__ import annotations

from typing import Any

import pytest

from loadtests import bench_gateway, bench_ledger


def test_percentile_ms_is_nearest_rank_for_every_sample_count() -> None:
    hundred = [k / 1000 for k in range(1, 101)]  # 1..100 ms
    assert bench_gateway.percentile_ms(hundred, 0.99) == 99.0  # ceil(0.99 * 100) = 99th value
    ten = [k / 1000 for k in range(1, 11)]
    assert bench_gateway.percentile_ms(ten, 0.50) == 5.0  # ceil(0.5 * 10) = 5th value


def test_bench_ledger_call_p99_is_nearest_rank() -> None:
    result = bench_ledger.case_result("x", 1, 1, 100, 0, [k / 1000 for k in range(1, 101)], 1.0, 0.1)
    assert result.call_p99_ms == 99.0


def _summary(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"benchmark": "bench_gateway", "ledger_check": {"holds": True, "broken": []},
                            "gateway_exit_code": 0, "phases": []}
    base.update(overrides)
    return base


@pytest.mark.parametrize("summary", [
    _summary(ledger_check={"holds": False, "broken": ["float_balance_matches_transfers"]}),
    _summary(gateway_exit_code=1),
])
def test_bench_gateway_fails_when_the_gateway_or_its_ledger_did(monkeypatch: pytest.MonkeyPatch,
                                                                summary: dict[str, Any]) -> None:
    monkeypatch.setattr(bench_gateway, "run_in_deployment", lambda prefix, body, keep: summary)
    assert bench_gateway.main([]) != 0, "make bench would publish these figures as a successful run"


def test_bench_ledger_fails_when_the_ledger_check_does(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    class Cluster:
        def __init__(self, *args: object, **kwargs: object) -> None: ...
        def init(self) -> None: ...
        def start(self) -> None: ...
        def stop(self) -> None: ...
        def destroy(self) -> None: ...

    async def bench(args: object, cluster: object, workdir: object) -> dict[str, Any]:
        return {"benchmark": "bench_ledger", "ledger_check": {"ran": True, "holds": False, "broken": ["x"]}}

    monkeypatch.setattr(bench_ledger, "LocalCluster", Cluster)
    monkeypatch.setattr(bench_ledger, "bench", bench)
    assert bench_ledger.main([]) != 0


def test_make_loadtest_fails_when_the_gateway_exits_with_an_error(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path) -> None:  # type: ignore[no-untyped-def]
    from loadtests import run_locust

    class Deployment:
        def __init__(self, data_dir, *args: object, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
            self.data_dir = data_dir

        def http_get(self, path: str, **kwargs: object) -> str:
            return ""

        def stop_gateway(self) -> int:
            return 1  # vendgate serve crashed, or was killed after the stop bound

        def destroy(self) -> None: ...

    async def nothing(*args: object) -> dict[str, Any]:
        return {"holds": True, "broken": [], "transfers": 0}

    monkeypatch.delenv("VENDGATE_TARGET", raising=False)
    monkeypatch.setattr(run_locust, "LocalDeployment", Deployment)
    monkeypatch.setattr(run_locust, "_prepare", nothing)
    monkeypatch.setattr(run_locust, "_ledger_check", nothing)
    monkeypatch.setattr(run_locust, "run_locust", lambda args, target: 0)
    monkeypatch.setattr(run_locust, "read_stats", lambda d: {"total": {"requests": 1000, "failures": 0},
                                                             "requests": {}, "failures": []})
    assert run_locust.main(["--reports-dir", str(tmp_path)]) != 0
