"""The retention models: a small MLP, or a logistic regression, with a churn head and an LTV head.

``model = "logreg"`` is the same network without hidden layers: one ``nn.Linear`` from the
standardised features to [retention logit, log1p(LTV)], i.e. a logistic regression and a
linear regression sharing one parameter vector — so FedAvg/FedProx, the flat-array protocol,
DP-SGD's book-keeping clipping and the aggregate mode all work on it unchanged.

No BatchNorm (Opacus cannot clip per-sample gradients through it) and one output
layer of width 2 — column 0 is the logit of "buys again within the horizon",
column 1 is the predicted ``log1p(spend)`` in the horizon — so one per-sample loss
covers both heads and DP-SGD clips them together.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MODEL_KINDS = ("mlp", "logreg")


def check_model_kind(kind: str, hidden: Sequence[int]) -> tuple[int, ...]:
    """The hidden widths a model kind uses (logreg: none); refuses unknown kinds and an MLP without layers."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    if kind == "logreg":
        return ()
    hidden = tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"model mlp needs at least one hidden layer of width >= 1, got hidden={list(hidden)}")
    return hidden


def model_kind(hidden: Sequence[int]) -> str:
    """The kind a network's hidden widths make: no hidden layer is a logistic regression."""
    return "mlp" if len(tuple(hidden)) else "logreg"


def make_model(kind: str, n_inputs: int, hidden: Sequence[int] = (64, 32), prior_rate: float = 0.0) -> RetentionNet:
    """A fresh network of ``kind`` (``hidden`` is ignored for logreg).

    ``prior_rate`` > 0 starts the retention logit at that repeat rate (``prior_bias``): with 1-3 %
    positives a model started at p = 0.5 spends its first rounds only walking its bias down, and
    few-round federated runs end miscalibrated (high log loss) and behind a logistic regression.
    """
    model = RetentionNet(n_inputs, check_model_kind(kind, hidden))
    if kind == "logreg":  # convex: no symmetry to break, so start from "no opinion" rather than random weights
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    if prior_rate:
        if not 0 < prior_rate < 1:
            raise ValueError(f"prior-rate must be in (0, 1), got {prior_rate}")
        prior_bias(model, prior_rate)
    return model


def prior_bias(model: RetentionNet, base_rate: float) -> None:
    """Start the retention logit at the base rate's log-odds (rare positives: no long walk from p = 0.5)."""
    p = min(max(float(base_rate), 1e-4), 1 - 1e-4)
    with torch.no_grad():
        model.head.bias[0] = float(np.log(p / (1 - p)))


class RetentionNet(nn.Module):
    """MLP trunk with a 2-wide head: [retention logit, log1p(LTV)]."""

    def __init__(self, n_inputs: int, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)
        self.n_inputs = n_inputs
        self.hidden = tuple(int(h) for h in hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class RetentionLoss(nn.Module):
    """BCE on the retention logit plus ``ltv_weight`` × MSE on log1p(spend).

    ``reduction`` may be ``"mean"``, ``"sum"`` or ``"none"`` (per-sample), which is what
    Opacus's ghost clipping needs from a criterion.
    """

    def __init__(self, ltv_weight: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        self.ltv_weight = float(ltv_weight)
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(output[:, 0], target[:, 0], reduction="none")
        mse = (output[:, 1] - target[:, 1]) ** 2
        per_sample = bce + self.ltv_weight * mse
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


@dataclass
class Standardizer:
    """Feature-wise (clip(x, lower, upper) - mean) / std.

    Runs use the public transform of :mod:`fedretain.transforms` (declared ranges, no
    statistics from any node); ``from_moments``/``fit`` remain for local, centralised use
    and for bundles written before that change (no clip bounds: ``lower``/``upper`` None).
    """

    mean: np.ndarray
    std: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    source: str = "moments"

    @classmethod
    def from_moments(cls, count: float, total: np.ndarray, total_sq: np.ndarray) -> Standardizer:
        """Build from summed moments (what nodes send: counts and sums, never rows)."""
        if count <= 1:
            raise ValueError("cannot standardise with fewer than 2 examples")
        mean = np.asarray(total, dtype=np.float64) / count
        var = np.asarray(total_sq, dtype=np.float64) / count - mean**2
        std = np.sqrt(np.clip(var, 0.0, None))
        return cls(mean=mean, std=np.where(std < 1e-6, 1.0, std))

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, dtype=np.float64)
        return cls.from_moments(len(x), x.sum(axis=0), (x**2).sum(axis=0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.lower is not None and self.upper is not None:
            x = np.clip(x, self.lower, self.upper)
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": np.asarray(self.mean).tolist(), "std": np.asarray(self.std).tolist(),
                               "transform": self.source}
        if self.lower is not None and self.upper is not None:
            out["lower"] = np.asarray(self.lower).tolist()
            out["upper"] = np.asarray(self.upper).tolist()
        return out

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Standardizer:
        lower, upper = payload.get("lower"), payload.get("upper")
        return cls(np.asarray(payload["mean"], float), np.asarray(payload["std"], float),
                   None if lower is None else np.asarray(lower, float),
                   None if upper is None else np.asarray(upper, float),
                   str(payload.get("transform", "moments")))


@dataclass
class ModelBundle:
    """Everything needed to score users later: weights, feature names, standardiser, provenance."""

    state_dict: dict[str, torch.Tensor]
    feature_names: list[str]
    standardizer: Standardizer
    hidden: tuple[int, ...] = (64, 32)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # "mlp" | "logreg"; empty: from ``hidden`` (no hidden layer = logreg)

    def __post_init__(self) -> None:
        self.kind = self.kind or model_kind(self.hidden)
        self.hidden = check_model_kind(self.kind, self.hidden)

    def build_model(self) -> RetentionNet:
        model = make_model(self.kind, len(self.feature_names), self.hidden)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": "fedretain-model/1",
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "feature_names": list(self.feature_names),
            **self.standardizer.to_payload(),
            "hidden": list(self.hidden),
            "model": self.kind,
            "meta": self.meta,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file
            raise ValueError(f"{path}: not a readable fedretain checkpoint ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != "fedretain-model/1":
            raise ValueError(f"{path}: not a fedretain model checkpoint (missing format tag)")
        try:
            return cls(
                state_dict=payload["state_dict"],
                feature_names=list(payload["feature_names"]),
                standardizer=Standardizer.from_payload(payload),
                hidden=tuple(payload["hidden"]),
                meta=dict(payload.get("meta", {})),
                kind=str(payload.get("model", "")),  # checkpoints before model kinds: inferred from hidden
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a usable fedretain checkpoint ({exc})") from exc
