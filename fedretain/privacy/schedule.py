"""DP defaults that fit the data: batch (sampling rate) and rounds chosen from how many records there are.

A fixed batch and round count cannot suit both a 300-customer pool and a 300,000-customer one:
with 4096 expected customers per step and 3,000 customers the sampling rate is clamped to 1
(not the batch the operator asked for, and no privacy amplification), and with 5 rounds of one
step each aggregate mode hardly learns. Every ε here is computed by the Opacus accountant
(``fedretain.privacy.accountant.calibrate``); this module only chooses among candidates.

Why these rules (docs/PRIVACY.md, "DP defaults"): for a fixed number of steps the noise on each
averaged gradient, σ·C/B, falls as the expected batch B grows (the calibrated σ grows more slowly
than B); from q = 1/4 to q = 1 it falls by only 5–15% while the work per round quadruples, so
q = 1/4 is the default. More steps need more noise per step, but too few steps leave the model
unconverged (the benchmark above), so the schedule takes at least 50 and more while σ stays sane.

* **Aggregate mode** (one DP-SGD step per round over the pooled, declared population N):
  expected batch B = N/4 (at most 8192, at least 64), then the most rounds from
  ``AGGREGATE_ROUND_CHOICES`` whose σ stays ≤ min(``SIGMA_MAX``, ``RHO_MAX``·B) (at least the
  smallest choice). The operator may fix the batch, the rounds, or both (``dp-schedule fixed``).
* **Local mode** (DP-SGD on each node over its own n customers): batch = n/8 within [32, 1024],
  so a silo takes at least 8 steps an epoch and larger silos get larger batches; tiny silos
  (q clamped near 1) get a note in the record: local DP leaves them mostly noise.

Warnings (sampling rate clamped to 1, σ above 4, σ/B above 0.005: a pool too small for the ε) are
returned as plain sentences;
the server puts them into ``run.json`` events and the CLI prints them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedretain.privacy.accountant import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    DpEvent,
    PrivacyError,
    calibrate,
    check_accountant,
    default_delta,
)

SCHEDULES = ("auto", "fixed")
AGGREGATE_SHARE = 0.25  # expected batch = a quarter of the pooled customers: q = 1/4 keeps amplification
AGGREGATE_MIN_BATCH = 64
AGGREGATE_MAX_BATCH = 8192  # customers whose clipped gradients are computed per round, over all merchants
# one SecAgg+ exchange each; at least 50 steps: with 20 the server's Adam has not converged (bench_dp_schedule.py:
# 4 synthetic merchants, N=573, ε=3, 5 seeds: AUC 0.725 ± 0.113 with 20 rounds, 0.781 ± 0.014 with 50 at B=N/4)
AGGREGATE_ROUND_CHOICES = (50, 80, 120, 200)
SIGMA_MAX = 4.0  # above this more noise per step buys too little: fewer, less noisy steps learn more
RHO_MAX = 0.005  # noise std per coordinate of the averaged clipped gradient (σ/B, in units of the clipping norm)
LOCAL_STEPS_PER_EPOCH = 8
LOCAL_MIN_BATCH = 32
LOCAL_MAX_BATCH = 1024
TINY_SILO = 4 * LOCAL_MIN_BATCH  # below this a silo has at most 4 batches an epoch


def check_schedule(value: str) -> str:
    if value not in SCHEDULES:
        raise ValueError(f"unknown dp-schedule {value!r}; choose one of {', '.join(SCHEDULES)}")
    return value


@dataclass(frozen=True)
class AggregateSchedule:
    """Aggregate mode's (B, rounds) and why: what the run record stores under ``dp_schedule``."""

    population: int
    expected_batch: float
    sample_rate: float
    rounds: int
    noise_multiplier: float
    batch_chosen_by: str  # "auto" or "operator"
    rounds_chosen_by: str
    reason: str
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": "aggregate", **asdict(self)}


def clamp_warning(batch: float, population: int) -> str | None:
    """The sentence the operator must see when B ≥ N makes q = 1 (every record in every step)."""
    if batch < population:
        return None
    return (f"the expected batch {batch:g} is not below the pooled population N={population}: the sampling rate "
            f"is clamped to 1 (every step uses all N customers, not {batch:g}; no privacy amplification by "
            f"sampling, so σ must be larger); use a smaller aggregate batch size or leave it to dp-schedule auto")


def sigma_warning(sigma: float, batch: float, rounds: int) -> str | None:
    if sigma <= SIGMA_MAX:
        return None
    return (f"noise multiplier σ={sigma:.2f} is above {SIGMA_MAX:g} at B={batch:g}, {rounds} rounds: the pooled "
            f"population is small for this ε, expect a model that learns little (fewer rounds or a larger ε help)")


def noise_warning(sigma: float, batch: float, population: int) -> str | None:
    if sigma / batch <= RHO_MAX:
        return None
    return (f"the pooled population N={population} is small for this ε: the noise on each averaged gradient is "
            f"σ/B={sigma / batch:.3g} of the clipping norm per coordinate (sane: ≤ {RHO_MAX:g}); expect a model "
            f"that learns little (a larger ε or more merchants help)")


def aggregate_schedule(target_epsilon: float, target_delta: float, population: int, *, batch: float | None = None,
                       rounds: int | None = None, accountant: str = DEFAULT_ACCOUNTANT) -> AggregateSchedule:
    """Choose the expected batch and rounds the operator left open (``None``) for N pooled customers."""
    if population < 1:
        raise PrivacyError(f"aggregate mode needs a declared population N >= 1, got {population}")
    delta = target_delta or default_delta(population)
    if batch is None:
        b = float(min(AGGREGATE_MAX_BATCH, max(AGGREGATE_MIN_BATCH, math.floor(AGGREGATE_SHARE * population))))
        batch_why = (f"B = N/4 within [{AGGREGATE_MIN_BATCH}, {AGGREGATE_MAX_BATCH}]: the largest batch that still "
                     f"samples (q ≤ 1/4), so the noise on each averaged gradient (σ·C/B) is small")
    else:
        if not batch > 0:
            raise PrivacyError(f"aggregate batch size must be positive, got {batch:g}")
        b, batch_why = float(batch), "B set by the operator"
    q = min(1.0, b / population)
    accountant = check_accountant(accountant)
    if rounds is None:
        # σ grows with the rounds; the sane σ for this batch is at most min(SIGMA_MAX, RHO_MAX·B). A choice fits
        # when that σ spends no more than the target over its rounds (one Opacus accountant evaluation each).
        cap = min(SIGMA_MAX, RHO_MAX * b)
        fits = [t for t in AGGREGATE_ROUND_CHOICES
                if Accountant(accountant, [DpEvent(cap, q, t)]).epsilon(delta) <= target_epsilon]
        t = max(fits, default=AGGREGATE_ROUND_CHOICES[0])
        rounds_why = (f"the most rounds of {list(AGGREGATE_ROUND_CHOICES)} whose noise multiplier stays ≤ "
                      f"min({SIGMA_MAX:g}, {RHO_MAX:g}·B) (more steps need more noise per step)")
    else:
        if rounds < 1:
            raise PrivacyError(f"aggregate mode needs at least one round, got {rounds}")
        t, rounds_why = int(rounds), "rounds set by the operator"
    s = calibrate(float(target_epsilon), delta, q, t, accountant)
    warnings = [w for w in (clamp_warning(b, population), sigma_warning(s, min(b, population), t),
                                noise_warning(s, min(b, population), population))
                if w]
    return AggregateSchedule(population, min(b, float(population)), q, t, s,
                             "auto" if batch is None else "operator", "auto" if rounds is None else "operator",
                             f"{batch_why}; {rounds_why}", warnings)


def local_batch_size(n: int) -> int:
    """Local mode's batch for a silo of n training customers: n/8 within [32, 1024] (≥ 8 steps an epoch)."""
    if n < 1:
        raise PrivacyError("no training records on this node")
    return int(min(LOCAL_MAX_BATCH, max(LOCAL_MIN_BATCH, n // LOCAL_STEPS_PER_EPOCH)))


def local_schedule_note(n: int, batch: int, chosen_by: str) -> dict[str, Any]:
    """What a node reports about its local batch: the size, q, who chose it and, for a tiny silo, a note."""
    batches = math.ceil(n / batch)
    note = ""
    if batches == 1:
        note = (f"sampling rate clamped to 1: the batch {batch} is not below this silo's {n} customers "
                f"(every customer in every step, no privacy amplification)")
    elif n < TINY_SILO:
        note = (f"tiny silo ({n} customers): local DP-SGD leaves its update mostly noise; aggregate mode "
                f"(noise once on the pooled sum) suits such silos better")
    return {"batch": batch, "sample_rate": 1.0 / batches, "chosen_by": chosen_by, "note": note}


FIXED_AGGREGATE_BATCH = 4096  # dp-schedule fixed without aggregate-batch-size (the pre-issue-12 default)


def operator_batch(settings: Any) -> float | None:
    """The operator's aggregate batch (run_config ``aggregate-batch-size``), None when left open (absent or 0)."""
    raw = settings.extra.get("aggregate-batch-size")
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise PrivacyError(f"aggregate-batch-size must be a number (0: chosen by dp-schedule auto), "
                           f"got {raw!r}") from None
    if value < 0:
        raise PrivacyError(f"aggregate-batch-size must be >= 0 (0: chosen by dp-schedule auto), got {value:g}")
    return value or None


def aggregate_schedule_for(settings: Any, population: int, epsilon: float) -> AggregateSchedule:
    """The schedule of an aggregate run (``RunSettings``): auto leaves open what the operator did not set."""
    batch = operator_batch(settings)
    if settings.dp_schedule == "auto":
        return aggregate_schedule(epsilon, settings.target_delta, population, batch=batch, rounds=None,
                                  accountant=str(settings.extra.get("dp-accountant", DEFAULT_ACCOUNTANT)))
    return aggregate_schedule(epsilon, settings.target_delta, population, batch=batch or FIXED_AGGREGATE_BATCH,
                              rounds=int(settings.rounds),
                              accountant=str(settings.extra.get("dp-accountant", DEFAULT_ACCOUNTANT)))


def local_batch_for(settings: Any, n: int) -> int:
    """The batch a node of n training users uses in local mode (the node applies the same rule)."""
    return local_batch_size(n) if settings.dp_schedule == "auto" else int(settings.batch_size)


def local_schedule_record(settings: Any) -> dict[str, Any]:
    """What run.json says about local mode's batches: the rule, not the per-node sizes (they reveal counts)."""
    if settings.dp_schedule == "auto":
        rule = (f"each node: batch = its training users / {LOCAL_STEPS_PER_EPOCH} within [{LOCAL_MIN_BATCH}, "
                f"{LOCAL_MAX_BATCH}] (at least {LOCAL_STEPS_PER_EPOCH} DP-SGD steps an epoch; larger silos, larger "
                f"batches, less noise per averaged gradient)")
        return {"mode": "local", "schedule": "auto", "rule": rule, "rounds": int(settings.rounds),
                "chosen_by": "each node, from its own count, which it does not send (its ledger keeps the plan)"}
    return {"mode": "local", "schedule": "fixed", "rule": f"batch-size {settings.batch_size} on every node",
            "rounds": int(settings.rounds), "chosen_by": "operator"}
