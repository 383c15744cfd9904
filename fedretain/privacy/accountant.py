"""Privacy accounting: a thin, persistable wrapper over Opacus's accountants.

Nothing here computes ε itself. Opacus's RDP and PRV accountants do (both account
the Poisson-subsampled Gaussian mechanism of DP-SGD under add/remove-one-record
adjacency); this module only

* calibrates a noise multiplier for a whole run up front (``calibrate``), because the
  noise of every local step must be fixed before the first step;
* serialises an accountant's history to JSON so a node can restore it after a
  restart (Flower's ``context.state`` lives in the SuperNode's memory only);
* offers an *independent* recomputation with Google's ``dp-accounting`` package
  (``independent_epsilon``), used by the tests to cross-check Opacus.

RDP is the default: it is deterministic, fast (≈0.1 s per ε query, PRV ≈0.5 s and
≈10 s to calibrate) and a valid upper bound; PRV is tighter (≈5% less noise for the
same ε) and can be selected per run.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_ACCOUNTANT = "rdp"
EPSILON_TOLERANCE = 0.01  # calibration stops within this much *below* the target ε


class PrivacyError(RuntimeError):
    """A privacy check failed; the operation was refused before anything was released."""


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"unknown DP accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name


def default_delta(n: int) -> float:
    """δ below 1/n for a dataset of n records: 1/(10 n), capped at 1e-5 for large data."""
    if n < 1:
        raise PrivacyError("cannot choose δ for an empty dataset")
    return min(1e-5, 1.0 / (10.0 * n))


@dataclass(frozen=True)
class DpEvent:
    """``steps`` Poisson-subsampled Gaussian steps (noise multiplier σ, sampling rate q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise multiplier must be positive and finite, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sampling rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0, got {self.steps}")


def _opacus(name: str) -> Any:  # local import: opacus costs ~3 s to import
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=check_accountant(name))


@functools.lru_cache(maxsize=4096)
def _epsilon(name: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of a history (pure, so cached: every node of an aggregate run asks for the same one)."""
    acc = _opacus(name)
    acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": acc.mechanism()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Optimal order is the largest alpha" etc.
        return float(acc.get_epsilon(delta=delta))


class Accountant:
    """An Opacus accountant whose history can be saved to and restored from JSON."""

    def __init__(self, name: str = DEFAULT_ACCOUNTANT, history: list[DpEvent] | None = None) -> None:
        self.name = check_accountant(name)
        self.opacus = _opacus(self.name)
        for ev in history or []:
            self.add(ev)

    @property
    def history(self) -> list[DpEvent]:
        return [DpEvent(float(s), float(q), int(t)) for s, q, t in self.opacus.history]

    @property
    def steps(self) -> int:
        return sum(ev.steps for ev in self.history)

    def add(self, event: DpEvent) -> None:
        """Compose ``event`` (merges with the last entry when σ and q are equal, as Opacus does)."""
        if event.steps == 0:
            return
        hist = list(self.opacus.state_dict()["history"])
        if hist and hist[-1][0] == event.noise_multiplier and hist[-1][1] == event.sample_rate:
            hist[-1] = (event.noise_multiplier, event.sample_rate, hist[-1][2] + event.steps)
        else:
            hist.append((event.noise_multiplier, event.sample_rate, event.steps))
        self.opacus.load_state_dict({"history": hist, "mechanism": self.opacus.mechanism()})

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before the first step)."""
        if not 0 < delta < 1:
            raise PrivacyError(f"δ must be in (0, 1), got {delta}")
        if not self.opacus.history:
            return 0.0
        return _epsilon(self.name, tuple(tuple(h) for h in self.opacus.history), float(delta))

    def epsilon_after(self, event: DpEvent, delta: float) -> float:
        """ε if ``event`` were composed now, without changing this accountant."""
        trial = Accountant(self.name, self.history)
        trial.add(event)
        return trial.epsilon(delta)

    def hook(self, sample_rate: float) -> Any:
        """Opacus optimizer step hook that composes one step at ``sample_rate`` per optimizer step."""
        return self.opacus.get_optimizer_hook_fn(sample_rate=sample_rate)

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.name, "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self.history]}

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_state(cls, state: dict[str, Any] | str) -> Accountant:
        data = json.loads(state) if isinstance(state, str) else state
        try:
            return cls(str(data["mechanism"]), [DpEvent(float(s), float(q), int(t)) for s, q, t in data["history"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(f"unreadable accountant state ({exc}): refusing to guess the privacy spent") from exc


@functools.lru_cache(maxsize=256)  # pure and costly (≈15 ε evaluations): benches and tests reuse it
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int,
              accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Noise multiplier σ such that ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``.

    Opacus's binary search (``get_noise_multiplier``) returns σ whose ε is within
    ``EPSILON_TOLERANCE`` *below* the target; we re-check the result and fail closed.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"target ε must be positive and finite, got {target_epsilon}")
    if steps < 1:
        raise PrivacyError(f"a DP run needs at least one step, got {steps}")
    DpEvent(1.0, sample_rate, steps)  # validates q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=int(steps),
            accountant=check_accountant(accountant), epsilon_tolerance=EPSILON_TOLERANCE,
        ))
    spent = Accountant(accountant, [DpEvent(sigma, sample_rate, steps)]).epsilon(delta)
    if spent > target_epsilon:
        raise PrivacyError(f"calibration failed: σ={sigma:.4f} spends ε={spent:.4f} > target {target_epsilon}")
    return sigma


def independent_epsilon(events: list[DpEvent], delta: float, method: str = "rdp") -> float:
    """ε of ``events`` computed by Google's ``dp-accounting`` (RDP or PLD), not by Opacus.

    Used to cross-check Opacus: ``method="rdp"`` should match Opacus RDP (same orders),
    ``method="pld"`` should match Opacus PRV (both numerically tight).
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    parts = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
            e.steps,
        )
        for e in events if e.steps
    ]
    if method == "rdp":
        from opacus.accountants import RDPAccountant

        acc = rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    elif method == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    else:
        raise PrivacyError(f"unknown independent method {method!r} (rdp or pld)")
    acc.compose(dp_accounting.ComposedDpEvent(parts))
    return float(acc.get_epsilon(delta))
