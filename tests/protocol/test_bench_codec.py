"""The codec benchmark runs and reports what it promises (its speed is not asserted: not a timed test)."""

from __future__ import annotations

import json

import pytest

from loadtests import bench_codec


def test_bench_prints_one_json_object_as_its_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_codec.main(["--rounds", "50", "--repeats", "1", "--no-pin"]) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["benchmark"] == "codec" and figures["rounds"] == 50 and figures["cpu"] is None
    assert figures["us_per_message"] > 0 and figures["reference_us_per_message"] > 0
    assert figures["ratio_to_reference"] == pytest.approx(
        figures["us_per_message"] / figures["reference_us_per_message"], rel=0.01
    )
    assert figures["target_us_per_message"] == 10.0
    assert figures["frame_bytes"]["top_up_request"] < figures["frame_bytes"]["top_up_result"]


def test_the_benchmark_messages_survive_the_round_trip() -> None:
    terminal, server = bench_codec.logged_on_pair()
    [received] = server.receive_data(terminal.send(bench_codec.REQUEST))
    assert received.message == bench_codec.REQUEST  # type: ignore[union-attr]
    [answered] = terminal.receive_data(server.send(bench_codec.RESULT))
    assert answered.message == bench_codec.RESULT
