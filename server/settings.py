"""Run settings of a federated training run, read from Flower's run_config.

One typed, validated object instead of string lookups scattered through the server:
unknown strategies, purposes or features fail here, before any node is contacted.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from fedretain.consent.vocab import check_purpose
from fedretain.features import DEFAULT_FEATURES, check_features
from fedretain.models import MODEL_KINDS, check_model_kind
from fedretain.privacy.schedule import check_schedule

STRATEGIES = ("fedavg", "fedprox")
DP_MODES = ("none", "local", "central", "aggregate")

# run_config keys the servers read from ``RunSettings.extra`` (not fields): declared here so that
# ``fedretain simulate`` can offer each one (tests/test_run_settings_cli.py keeps both lists in step)
SERVER_EXTRA_KEYS = (
    "secure-aggregation", "dp-accountant", "dp-clipping", "eval-epsilon", "aggregate-batch-size",
    "aggregate-population", "server-learning-rate", "secagg-num-shares", "secagg-reconstruction-threshold",
    "witness-db", "data-dir",
)


@dataclass(frozen=True)
class RunSettings:
    """Everything the ServerApp needs to run (and resume) one federated training run."""

    rounds: int = 5
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    local_epochs: int = 2
    batch_size: int = 256
    learning_rate: float = 0.01
    purpose: str = "retention_modeling"
    horizon_days: float = 30.0
    cutoff: str = ""  # feature cutoff (server's choice); consent is evaluated at each node's own clock
    features: tuple[str, ...] = DEFAULT_FEATURES
    hidden: tuple[int, ...] = (64, 32)
    model: str = "mlp"  # one of MODEL_KINDS; logreg has no hidden layers (hidden is set to ())
    prior_rate: float = 0.0  # > 0: start the retention logit at this repeat rate (rare repeat purchases)
    min_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    round_retries: int = 1
    out_dir: str = "runs"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    resume: bool = False
    seed: int = 0
    dp_mode: str = "none"
    target_epsilon: float = 3.0
    target_delta: float = 0.0  # 0 → chosen per node below 1/n
    max_grad_norm: float = 10.0  # keeps log loss near the non-private model's (docs/PRIVACY.md)
    max_merchants_per_person: int = 1  # the platform's declared bound k (person-level ε, privacy/person.py)
    person_epsilon_cap: float = 0.0  # refuse a DP run whose person-level ε at k exceeds this; 0 = no cap
    # DP batch/rounds: "auto" fits them to the data (fedretain/privacy/schedule.py), "fixed" uses the settings
    # as given. The operator's entry points (simulate, pyproject run config) default to auto; "fixed" here
    # keeps code that builds RunSettings directly on the numbers it passes.
    dp_schedule: str = "fixed"
    eval_fraction: float = 0.3  # share of each node's users held out for evaluation (never trained on)
    # model "auto" (server/selection.py): candidates compared on a validation share of the training users
    validation_fraction: float = 0.2
    selection_rounds: int = 2
    selection_learning_rates: tuple[float, ...] = ()  # empty: learning_rate only
    refit: bool = False  # after selection, train the chosen model on training + validation users
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"unknown dp-mode {self.dp_mode!r}; choose one of {', '.join(DP_MODES)}")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("strategy fedprox needs proximal-mu > 0")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.min_nodes < 1:
            raise ValueError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.max_merchants_per_person < 1:
            raise ValueError(f"max-merchants-per-person must be >= 1, got {self.max_merchants_per_person}")
        if not self.person_epsilon_cap >= 0:
            raise ValueError(f"person-epsilon-cap must be >= 0 (0: no cap), got {self.person_epsilon_cap}")
        check_purpose(self.purpose)
        check_features(self.features)
        if self.model not in (*MODEL_KINDS, "auto"):
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_KINDS)} or auto")
        object.__setattr__(self, "hidden", check_model_kind("mlp" if self.model == "auto" else self.model,
                                                            self.hidden))
        if self.model == "auto" and self.dp_mode != "none":
            raise ValueError("model auto trains every candidate on the merchants' data, which a DP mode would have "
                             "to charge to their budgets (not supported yet): choose --model mlp or logreg")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation-fraction is the share of each merchant's training users used to compare "
                             f"models and must be strictly between 0 and 1, got {self.validation_fraction}")
        if self.refit and self.model != "auto":
            raise ValueError("refit applies after model selection (model auto); without it the model already "
                             "trains on all of each merchant's non-test users")
        if self.selection_rounds < 1:
            raise ValueError(f"selection-rounds must be >= 1, got {self.selection_rounds}")
        if any(not lr > 0 for lr in self.selection_learning_rates):
            raise ValueError(f"selection-learning-rates must be positive, got {list(self.selection_learning_rates)}")
        if not 0 <= self.prior_rate < 1:
            raise ValueError(f"prior-rate must be in [0, 1), got {self.prior_rate}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval-fraction is the share of each merchant's users held out for evaluation and "
                             f"must be strictly between 0 and 1 (e.g. 0.3), got {self.eval_fraction}")
        check_schedule(self.dp_schedule)

    # Flower run_config keys (kebab-case, as in pyproject's [tool.flwr.app.config])
    _KEYS = {
        "num-server-rounds": "rounds", "strategy": "strategy", "proximal-mu": "proximal_mu",
        "local-epochs": "local_epochs", "batch-size": "batch_size", "learning-rate": "learning_rate",
        "purpose": "purpose", "horizon-days": "horizon_days", "cutoff": "cutoff",
        "features": "features", "hidden": "hidden", "min-nodes": "min_nodes", "fraction-train": "fraction_train",
        "round-timeout": "round_timeout", "node-wait-timeout": "node_wait_timeout",
        "round-retries": "round_retries", "out-dir": "out_dir", "run-id": "run_id", "resume": "resume",
        "seed": "seed", "dp-mode": "dp_mode", "target-epsilon": "target_epsilon",
        "target-delta": "target_delta", "max-grad-norm": "max_grad_norm",
        "max-merchants-per-person": "max_merchants_per_person", "person-epsilon-cap": "person_epsilon_cap",
        "model": "model", "prior-rate": "prior_rate", "dp-schedule": "dp_schedule",
        "eval-fraction": "eval_fraction", "validation-fraction": "validation_fraction",
        "selection-rounds": "selection_rounds", "selection-learning-rates": "selection_learning_rates",
        "refit": "refit",
    }

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Parse Flower's run_config; keys this server does not know are kept in ``extra``."""
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = cls._KEYS.get(key)
            if name is None:
                extra[key] = value
                continue
            if name == "features":
                value = tuple(v.strip() for v in str(value).split(",") if v.strip()) if value else DEFAULT_FEATURES
            elif name == "hidden":
                value = tuple(int(v) for v in str(value).split(",") if v.strip())
            elif name == "selection_learning_rates":
                value = tuple(float(v) for v in str(value).split(",") if v.strip())
            elif name in ("run_id",) and not value:
                continue
            kwargs[name] = value
        kwargs["extra"] = extra
        types = {f: type(getattr(cls(), f)) for f in ("rounds", "local_epochs", "batch_size", "min_nodes", "seed",
                                                          "round_retries", "max_merchants_per_person",
                                                          "selection_rounds")}
        for name, typ in types.items():
            if name in kwargs:
                kwargs[name] = typ(kwargs[name])
        for name in ("proximal_mu", "learning_rate", "horizon_days", "fraction_train", "round_timeout",
                     "node_wait_timeout", "target_epsilon", "target_delta", "max_grad_norm", "person_epsilon_cap",
                     "prior_rate", "eval_fraction", "validation_fraction"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        for flag in ("resume", "refit"):
            if flag in kwargs:
                kwargs[flag] = str(kwargs[flag]).lower() in ("1", "true", "yes")
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (Flower config values: str/int/float/bool)."""
        out: dict[str, Any] = {}
        for key, name in self._KEYS.items():
            value = getattr(self, name)
            if name == "features":
                value = ",".join(value)
            elif name in ("hidden", "selection_learning_rates"):
                value = ",".join(str(h) for h in value)
            out[key] = value
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        d["hidden"] = list(self.hidden)
        d["selection_learning_rates"] = list(self.selection_learning_rates)
        return d
