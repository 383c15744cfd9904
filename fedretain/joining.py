"""What a merchant gains by joining: local-only vs global vs global fine-tuned, on the node's own users.

A merchant decides to join on one question: is the shared model better for *my* customers than one
I train alone? Each node answers it locally — nothing here is sent anywhere — on its own held-out
users, for

* ``local``: the same recipe trained on this node's training users alone (same kind and optimiser;
  as many epochs as the whole federated run gave it), started at the node's *own* repeat rate
  (Jeffreys estimate (k + ½) / (n + 1) of k returning among n training users) — not at the run's
  prior rate, which is the marketplace's figure a merchant alone does not have;
* ``global``: the federated model as received;
* ``personalised``: the global model fine-tuned for one short round on the node's training users.

Decision rule (stated in the bench output too): the metric is the held-out **log loss**, a proper
scoring rule that is defined whatever the classes (AUC is reported where both classes occur). The
gain is local − best shared (> 0: joining helps), with a 95 % interval from the paired per-user
differences (normal approximation). A seller whose held-out users hold *no* returning customer
(most of a rare-repeat marketplace's long tail) gets a point estimate that only says which model
predicted lower chances — the interval cannot see the unobserved positives — so ``summarize``
reports such merchants as *undecidable* next to the overall shares, and the shares among the
decidable ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from torch import nn

from fedretain.metrics import roc_auc
from fedretain.models import make_model, model_kind
from fedretain.train import LocalTrainer, TrainConfig, predict

OPTIONS = ("local", "global", "personalised")


def _per_user_log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@dataclass(frozen=True)
class JoiningResult:
    """One node's comparison (log loss: lower is better; AUC NaN when the test users are one class)."""

    merchant: str
    n_train: int
    n_test: int
    log_loss: dict[str, float]
    auc: dict[str, float]
    best_shared: str  # "global" or "personalised"
    gain: float  # local log loss − best shared log loss (> 0: joining helps this merchant)
    gain_low: float
    gain_high: float
    test_positives: int = -1  # returning customers among the held-out users (-1: not recorded)

    @property
    def joining_helps(self) -> bool:
        return self.gain > 0

    @property
    def decidable(self) -> bool:
        """Both classes among the held-out users (or not recorded): the comparison sees a returning customer."""
        return self.test_positives < 0 or 0 < self.test_positives < self.n_test

    def as_dict(self) -> dict:
        return {**asdict(self), "joining_helps": self.joining_helps, "decidable": self.decidable}


def own_rate(y: np.ndarray) -> float:
    """A merchant's own repeat rate from its training labels (Jeffreys: (k + ½) / (n + 1))."""
    return (float(np.sum(y[:, 0])) + 0.5) / (len(y) + 1.0)


def compare(merchant: str, global_model: nn.Module, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray,
            config: TrainConfig, local_epochs: int, finetune_epochs: int = 1) -> JoiningResult:
    """Train the local-only and fine-tuned models on (x, y); score all three on (xt, yt). Inputs standardised."""
    if len(x) == 0 or len(xt) == 0:
        raise ValueError(f"{merchant}: needs training and held-out users to compare (has {len(x)} and {len(xt)})")
    kind = model_kind(getattr(global_model, "hidden", (64, 32)))
    local = make_model(kind, x.shape[1], getattr(global_model, "hidden", ()) or (64, 32), prior_rate=own_rate(y))
    LocalTrainer(replace(config, epochs=local_epochs)).fit(local, x, y)
    tuned = copy.deepcopy(global_model)
    LocalTrainer(replace(config, epochs=finetune_epochs)).fit(
        tuned, x, y, [p.detach().clone() for p in global_model.parameters()])
    probs = {"local": predict(local, xt)[0], "global": predict(global_model, xt)[0],
             "personalised": predict(tuned, xt)[0]}
    losses = {k: _per_user_log_loss(yt[:, 0], p) for k, p in probs.items()}
    mean = {k: float(v.mean()) for k, v in losses.items()}
    both = 0 < yt[:, 0].sum() < len(yt)
    auc = {k: (roc_auc(yt[:, 0], p) if both else float("nan")) for k, p in probs.items()}
    best = min(("global", "personalised"), key=lambda k: mean[k])
    diff = losses["local"] - losses[best]
    half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    gain = float(diff.mean())
    return JoiningResult(merchant, len(x), len(xt), mean, auc, best, gain, gain - half, gain + half,
                         int(yt[:, 0].sum()))


def summarize(results: list[JoiningResult]) -> dict:
    """Share of merchants, and of their (held-out + training) customers, for whom joining beats local-only."""
    if not results:
        return {"merchants": 0}
    helps = [r for r in results if r.joining_helps]
    customers = sum(r.n_train + r.n_test for r in results)
    # an interval is only evidence where a returning customer was held out (see the module note)
    sure = [r for r in results if r.decidable]
    return {
        "merchants": len(results),
        "share_merchants_joining_helps": len(helps) / len(results),
        "share_customers_joining_helps": sum(r.n_train + r.n_test for r in helps) / customers,
        "share_merchants_significant": sum(r.gain_low > 0 for r in sure) / len(results),
        # local-only significantly better: the honest counterpart
        "share_merchants_local_significant": sum(r.gain_high < 0 for r in sure) / len(results),
        "share_customers_local_significant": sum(r.n_train + r.n_test for r in sure if r.gain_high < 0) / customers,
        "share_merchants_personalised_best": sum(r.best_shared == "personalised" for r in helps) / len(results),
        **_decidable_shares(results, customers),
    }


def _decidable_shares(results: list[JoiningResult], customers: int) -> dict:
    """The same question asked only where the held-out users hold both classes (see the module note)."""
    known = [r for r in results if r.test_positives >= 0]
    if not known:
        return {}
    dec = [r for r in known if r.decidable]
    held = sum(r.n_train + r.n_test for r in dec)
    return {
        "share_merchants_undecidable": 1 - len(dec) / len(known),
        "share_customers_undecidable": 1 - held / sum(r.n_train + r.n_test for r in known),
        "share_customers_joining_helps_decidable": (
            sum(r.n_train + r.n_test for r in dec if r.joining_helps) / held if held else float("nan")),
    }
