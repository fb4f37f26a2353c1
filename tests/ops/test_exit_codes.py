"""The one "worst finding wins" rule (2 > 1 > 3 > 0) and its three users agreeing on it."""

from __future__ import annotations

import itertools

import pytest

from qpq_ops.cli.tune import checks_exit_code
from qpq_ops.doctor import CheckResult, CheckState, exit_code_for, worst
from qpq_ops.exit_codes import ExitCode
from qpq_ops.exit_codes import worst as worst_code
from qpq_ops.triggers import State, worst_state
from qpq_ops.tuning import CheckState as TuneState
from qpq_ops.tuning import SettingCheck

FINDINGS = (ExitCode.OK, ExitCode.WARNING, ExitCode.CRITICAL, ExitCode.CANNOT_EVALUATE)
RULE = (ExitCode.CRITICAL, ExitCode.WARNING, ExitCode.CANNOT_EVALUATE, ExitCode.OK)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_worst_finding_wins_in_design_order(size: int) -> None:
    for codes in itertools.permutations(FINDINGS, size):
        expected = next(code for code in RULE if code in codes)
        assert worst_code(codes) is expected, codes
    assert worst_code([]) is ExitCode.OK


def test_usage_is_not_a_finding() -> None:
    with pytest.raises(KeyError):
        worst_code([ExitCode.OK, ExitCode.USAGE])


def test_trigger_states_follow_the_rule() -> None:
    for states in itertools.permutations(list(State), 2):
        assert worst_state(states).exit_code is worst_code(s.exit_code for s in states)
    assert worst_state([]) is State.NO_DATA


def test_doctor_states_follow_the_rule_and_skipped_never_fails() -> None:
    def result(state: CheckState) -> CheckResult:
        return CheckResult("x", "x", state, "")

    for states in itertools.permutations(list(CheckState), 3):
        status = worst([result(s) for s in states])
        assert exit_code_for(status) is worst_code(exit_code_for(s) for s in states)
    assert worst([result(CheckState.SKIPPED)]) is CheckState.SKIPPED
    assert worst([result(CheckState.SKIPPED), result(CheckState.OK)]) is CheckState.OK
    assert worst([]) is CheckState.OK


def test_tune_checks_follow_the_rule() -> None:
    def check(state: TuneState) -> SettingCheck:
        return SettingCheck("n", 1, None, state, "")

    assert checks_exit_code([check(TuneState.UNKNOWN), check(TuneState.BELOW)]) == 1
    assert checks_exit_code([check(TuneState.OK), check(TuneState.UNKNOWN)]) == 3
    assert checks_exit_code([check(TuneState.OK)]) == 0
