"""bench/faults.py: a fault scenario is one registered function (the hook the worker scenario
plugs into). The scenarios themselves run on a whole node: tests/integration/test_bench.py,
test_server_crash.py, test_broker_crash.py."""

from __future__ import annotations


def test_a_fault_scenario_is_one_registered_function():
    """The hook another scenario (e.g. a worker SIGKILLed mid-burst) plugs into."""
    from bench import faults

    assert {"prefect-server-sigkill-mid-burst", "broker-sigkill-listener-away",
            "worker-sigkill-mid-burst"} <= set(faults.SCENARIOS)

    @faults.scenario("test-noop")
    def noop(ctx: faults.FaultContext) -> faults.FaultResult:
        return faults.FaultResult(scenario="test-noop", events_sent=0)

    try:
        assert faults.SCENARIOS["test-noop"] is noop
    finally:
        del faults.SCENARIOS["test-noop"]
