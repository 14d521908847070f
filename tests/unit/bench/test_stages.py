from __future__ import annotations

from bench.stages import markdown, summarize_runs


def _run(created: float, received: float | None) -> dict[str, float]:
    points = {"flow run Scheduled": created, "flow run Completed": created + 0.3}
    if received is not None:
        points["notification received"] = received
    return points


def test_the_timeline_gives_the_medians_and_the_slowest_runs_point_by_point() -> None:
    runs = [_run(0.02, 0.25), _run(0.03, 0.27), _run(0.9, 1.2), _run(0.02, 0.26),
            _run(0.05, 0.6), _run(0.02, None)]
    timeline = summarize_runs(runs)
    assert timeline.runs == 6
    assert timeline.points[0].name == "flow run Scheduled"
    assert [r["notification received"] for r in timeline.slowest] == [1.2, 0.6, 0.27]
    lines = markdown(timeline.model_dump())
    assert lines[2] == "| point | p50 | p90 | runs | slowest 1 | slowest 2 | slowest 3 |"
    assert "| flow run Scheduled | 0.025 |" in lines[4]
    assert lines[4].endswith("| 6 | 0.900 | 0.050 | 0.030 |")  # where the slowest run lost it


def test_a_timeline_of_earlier_results_has_no_slowest_columns() -> None:
    timeline = summarize_runs([_run(0.02, 0.25)]).model_dump()
    del timeline["slowest"]
    assert markdown(timeline)[2] == "| point | p50 | p90 | runs |"
