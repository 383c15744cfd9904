"""Opacus internals used by fedretain: the fused noise step of the DP optimizer.

``DPOptimizerFastGradientClipping`` adds noise one parameter tensor at a time and
deep-copies ``p.grad`` in ``accumulate``; on the small retention MLP those two per-step
costs dominate. :func:`fused_dp_optimizer` keeps Opacus's optimizer (clipping bound,
averaging, accountant hooks, ``secure_mode``) and replaces only those two methods,
drawing the noise of all parameters in one call of Opacus's own private
``_generate_noise`` (same i.i.d. N(0, (σC)²) per coordinate, same secure-mode sampler)
and keeping Opacus's processed-flag checks (``_check_processed_flag`` /
``_mark_as_processed``) that refuse a gradient noised twice. Those three names are
private to ``opacus.optimizers.optimizer``; they live here only (see
:mod:`fedretain.compat`).
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from fedretain.compat import check_versions

check_versions()

#: Non-public Opacus names this module uses (``tests/test_compat.py`` checks each still exists).
INTERNALS: tuple[tuple[str, str], ...] = (
    ("opacus.optimizers.optimizer", "_generate_noise"),
    ("opacus.optimizers.optimizer", "_check_processed_flag"),
    ("opacus.optimizers.optimizer", "_mark_as_processed"),
)


class FusedNoiseDPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` with one noise draw per step and a cheap ``accumulate``."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.detach().clone()

    def add_noise(self) -> None:
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        flat = torch.cat([p.summed_grad.reshape(-1) for p in params])
        flat = flat + _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=flat,
                                      generator=self.generator, secure_mode=self.secure_mode)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
            _mark_as_processed(p.summed_grad)


def fused_dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
                       expected_batch_size: float, generator: torch.Generator) -> Any:
    """Opacus's noise-adding optimizer for pre-clipped gradients, secure-mode noise, fused noise step."""
    return FusedNoiseDPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 expected_batch_size=expected_batch_size, loss_reduction="mean",
                                 generator=generator, secure_mode=True)


__all__ = ["INTERNALS", "FusedNoiseDPOptimizer", "fused_dp_optimizer"]
