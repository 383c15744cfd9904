"""The Gaussian mechanism for analytics answers: calibrated by Opacus, sampled by OpenDP.

Why this split. The node's privacy budget ledger (:mod:`fedretain.privacy.budget`) records
spend through an Opacus accountant, so the noise is calibrated with that same accountant
(:func:`fedretain.privacy.accountant.calibrate` with sampling rate 1 and one step: the plain
Gaussian mechanism, whose Rényi DP is exact) — the ε the ledger shows is the ε the
accountant computed for the released noise. The noise itself is drawn by OpenDP's
``make_gaussian`` measurement (a vetted sampler: exact discrete sampling driven by the OS
CSPRNG, immune to the floating-point attacks on naive samplers; ``numpy.random`` is not a
secure sampler). OpenDP's own privacy map then re-checks the release independently
(zCDP → (ε, δ)); if it disagrees with the ledger's accountant the release is refused.

Cells are first divided by their per-user bound, so the whole answer is one vector with L2
sensitivity ``sqrt(cells_per_user)``; noise of standard deviation ``σ · sqrt(m) · bound`` is
then what each cell carries, where σ is the noise multiplier for (ε, δ).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from fedretain.privacy.accountant import Accountant, DpEvent, PrivacyError, calibrate

ACCOUNTANT = "rdp"
MECHANISM = "gaussian (opendp make_gaussian; calibrated with the opacus rdp accountant)"
EPS_CHECK_SLACK = 1e-9


def _opendp():
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float) -> float:
    """σ such that the Gaussian mechanism with noise σ·Δ₂ is (ε, δ)-DP (Opacus RDP accountant)."""
    return calibrate(float(epsilon), float(delta), sample_rate=1.0, steps=1, accountant=ACCOUNTANT)


@dataclass(frozen=True)
class GaussianMechanism:
    """Gaussian noise for a vector of L2 sensitivity ``l2_sensitivity`` at (ε, δ)."""

    epsilon: float
    delta: float
    l2_sensitivity: float
    noise_multiplier: float

    @classmethod
    def calibrated(cls, epsilon: float, delta: float, l2_sensitivity: float) -> GaussianMechanism:
        if not (l2_sensitivity > 0 and math.isfinite(l2_sensitivity)):
            raise PrivacyError(f"L2 sensitivity must be positive and finite, got {l2_sensitivity}")
        mech = cls(float(epsilon), float(delta), float(l2_sensitivity), noise_multiplier(epsilon, delta))
        mech.check()
        return mech

    @property
    def scale(self) -> float:
        """Noise standard deviation on the bound-scaled vector."""
        return self.noise_multiplier * self.l2_sensitivity

    def accountant(self) -> Accountant:
        """The spend as the budget ledger records it: one unsampled Gaussian step."""
        return Accountant(ACCOUNTANT, [DpEvent(self.noise_multiplier, 1.0, 1)])

    def _measurement(self):
        dp = _opendp()
        return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float),
                                  scale=self.scale)

    def opendp_epsilon(self) -> float:
        """ε at δ by OpenDP's privacy map (ρ-zCDP of the measurement → approximate DP)."""
        dp = _opendp()
        profile = dp.c.make_zCDP_to_approxDP(self._measurement()).map(self.l2_sensitivity)
        return float(profile.epsilon(self.delta))

    def check(self) -> None:
        """Fail closed unless both the ledger's accountant and OpenDP put the release within ε."""
        acc = self.accountant().epsilon(self.delta)
        odp = self.opendp_epsilon()
        if acc > self.epsilon + EPS_CHECK_SLACK or odp > self.epsilon + EPS_CHECK_SLACK:
            raise PrivacyError(
                f"Gaussian noise σ={self.noise_multiplier:.4f} spends ε={acc:.4f} (opacus) / {odp:.4f} (opendp) "
                f"at δ={self.delta:g}, more than the query's ε={self.epsilon:g}; refusing to release"
            )

    def release(self, values: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noisy ``values`` and each cell's noise sd; ``bounds`` are the per-user bounds of the cells."""
        values = np.asarray(values, dtype=float)
        bounds = np.asarray(bounds, dtype=float)
        if values.shape != bounds.shape or values.ndim != 1:
            raise PrivacyError("values and bounds must be 1-d arrays of the same length")
        if not np.all(np.isfinite(values)) or np.any(bounds <= 0):
            raise PrivacyError("cannot release non-finite values or cells without a positive bound")
        if values.size == 0:
            return values.copy(), values.copy()
        noisy_scaled = np.asarray(self._measurement()((values / bounds).tolist()), dtype=float)
        return noisy_scaled * bounds, self.scale * bounds
