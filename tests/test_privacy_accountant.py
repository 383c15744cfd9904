"""Opacus's accountants (through fedretain.privacy.accountant) vs Google's dp-accounting."""

from __future__ import annotations

import json

import pytest

from fedretain.privacy.accountant import (
    Accountant,
    DpEvent,
    PrivacyError,
    calibrate,
    default_delta,
    independent_epsilon,
)

# Stated tolerances: RDP is the same closed-form bound in both libraries (same orders),
# so they must agree to 0.1 %; Opacus PRV and dp-accounting PLD are two different
# numerical methods for the tight bound and must agree to 2 %.
RDP_RTOL = 1e-3
PRV_PLD_RTOL = 2e-2

SETTINGS = [
    [DpEvent(1.0, 1 / 40, 400)],  # 20k rows, batch 512, 10 epochs
    [DpEvent(1.43, 1 / 12, 72)],  # a small merchant: 3k rows, batch 256, 3 rounds x 2 epochs
    [DpEvent(0.8, 0.01, 100), DpEvent(1.2, 0.02, 50)],  # a history with two mechanisms
]


@pytest.mark.parametrize("events", SETTINGS)
def test_opacus_rdp_matches_dp_accounting_rdp(events):
    ours = Accountant("rdp", events).epsilon(1e-5)
    theirs = independent_epsilon(events, 1e-5, method="rdp")
    assert ours == pytest.approx(theirs, rel=RDP_RTOL)


def test_opacus_prv_matches_dp_accounting_pld():
    events = [DpEvent(1.0, 1 / 40, 200)]
    ours = Accountant("prv", events).epsilon(1e-5)
    theirs = independent_epsilon(events, 1e-5, method="pld")
    assert ours == pytest.approx(theirs, rel=PRV_PLD_RTOL)
    assert ours < Accountant("rdp", events).epsilon(1e-5)  # PRV is the tighter bound


def test_calibrated_noise_spends_just_under_the_target():
    sigma = calibrate(3.0, 1e-5, 1 / 40, 400, "rdp")
    eps = independent_epsilon([DpEvent(sigma, 1 / 40, 400)], 1e-5, method="rdp")
    assert 2.97 <= eps <= 3.0
    # more steps at the same σ spend more: the calibration covers exactly the planned steps
    assert Accountant("rdp", [DpEvent(sigma, 1 / 40, 480)]).epsilon(1e-5) > 3.0


def test_state_round_trips_through_json_exactly():
    acc = Accountant("rdp")
    for _ in range(3):
        acc.add(DpEvent(1.1, 1 / 8, 10))
    restored = Accountant.from_state(json.loads(acc.to_json()))
    assert restored.history == [DpEvent(1.1, 1 / 8, 30)]
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    assert acc.epsilon_after(DpEvent(1.1, 1 / 8, 10), 1e-5) > acc.epsilon(1e-5)
    assert acc.steps == 30  # epsilon_after left the accountant alone


@pytest.mark.parametrize("state", ['{"history": []}', '{"mechanism": "rdp", "history": [[1.0]]}', "not json"])
def test_unreadable_state_fails_closed(state):
    with pytest.raises((PrivacyError, ValueError)):
        Accountant.from_state(state)


def test_bad_inputs_are_refused():
    with pytest.raises(PrivacyError):
        Accountant("gdp")
    with pytest.raises(PrivacyError):
        DpEvent(0.0, 0.1, 1)
    with pytest.raises(PrivacyError):
        DpEvent(1.0, 1.5, 1)
    with pytest.raises(PrivacyError):
        calibrate(float("inf"), 1e-5, 0.1, 10)


@pytest.mark.parametrize("n", [1, 70, 2_000, 10**7])
def test_default_delta_is_below_one_over_n(n):
    assert default_delta(n) < 1.0 / n
    assert default_delta(n) <= 1e-5
