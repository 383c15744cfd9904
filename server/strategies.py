"""Strategy set-up: Flower's own FedAvg / FedProx with fedretain's metric aggregation,
wrapped in Flower's central-DP wrapper when the run asks for ``dp-mode central``.

Central DP (``dp-mode central``) is *merchant-level* DP with a trusted server: the
server clips every merchant's model update to ``max-grad-norm`` and adds Gaussian
noise to the unweighted mean (Flower's ``DifferentialPrivacyServerSideFixedClipping``),
with Flower's RDP accountant (no amplification, add/remove-one-merchant) composing
one release per round. The noise multiplier is calibrated once for all rounds of
the run from (``target-epsilon``, ``target-delta``). Nodes train without noise and
report weight 1 (``dp-weight``), because the noise is calibrated for an unweighted
mean. ``local`` DP needs nothing from the strategy (nodes do DP-SGD); ``aggregate``
runs through the SecAgg+ workflow (``fedretain.server.secagg``).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from fedretain.server.federation import weighted_mean
from fedretain.server.settings import RunSettings

CENTRAL_WEIGHT_KEY = "dp-weight"  # what nodes report in central mode (clients/training.py)
CENTRAL_DEFAULT_DELTA = 1e-5


def build_strategy(settings: RunSettings) -> Strategy:
    """FedAvg, or FedProx for non-IID merchants (the client adds the proximal term); central DP wraps it."""
    central = settings.dp_mode == "central"
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes,
        min_available_nodes=settings.min_nodes,
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
    )
    if central:
        if settings.fraction_train != 1.0:
            raise ValueError("dp-mode central accounts without sampling amplification: use fraction-train = 1")
        common["weighted_by_key"] = CENTRAL_WEIGHT_KEY
    if settings.strategy == "fedprox":
        inner: Strategy = (CentralFedProx if central else FedProx)(proximal_mu=settings.proximal_mu, **common)
    else:
        inner = (CentralFedAvg if central else FedAvg)(**common)
    if central:
        return CentralDP(inner, settings.target_epsilon, settings.target_delta or CENTRAL_DEFAULT_DELTA,
                         settings.max_grad_norm, settings.rounds)
    return inner


class _EvaluateByExamples:
    """Train aggregation is unweighted (``dp-weight``); evaluation metrics stay weighted by examples."""

    weighted_by_key: str

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        key, self.weighted_by_key = self.weighted_by_key, "num-examples"
        try:
            return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        finally:
            self.weighted_by_key = key


class CentralFedAvg(_EvaluateByExamples, FedAvg):
    """FedAvg whose train mean is unweighted (what central DP's noise is calibrated for)."""


class CentralFedProx(_EvaluateByExamples, FedProx):
    """FedProx whose train mean is unweighted (what central DP's noise is calibrated for)."""


class CentralDP(Strategy):
    """Flower's server-side fixed-clipping DP wrapper, calibrated for a whole run and accounted.

    Flower's wrapper needs the number of sampled merchants up front; this strategy learns
    it from the first round's sampling and only then builds Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` through its public constructor, with
    Flower's RDP accountant (``accountant=``). On a resumed run the accountant first
    composes the releases of the rounds already done. Every later round must sample the
    same number of merchants, or Flower refuses the round. Each round's aggregated train
    metrics carry ``central-epsilon`` / ``central-delta`` (ε spent so far), which the
    run record keeps per round.
    """

    def __init__(self, strategy: Strategy, target_epsilon: float, target_delta: float, clipping_norm: float,
                 rounds: int) -> None:
        from fedretain.privacy.accountant import calibrate

        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError("central DP accounting needs a strategy that aggregates with FedAvg.aggregate_train")
        if not 0 < target_delta < 1:
            raise ValueError(f"central DP needs 0 < δ < 1, got {target_delta}")
        if clipping_norm <= 0:
            raise ValueError(f"central DP needs a positive clipping norm, got {clipping_norm}")
        self.strategy = strategy
        # one release per round, no sampling amplification: σ from Opacus's RDP with q = 1
        self.noise_multiplier = calibrate(float(target_epsilon), float(target_delta), 1.0, int(rounds), "rdp")
        self.clipping_norm = float(clipping_norm)
        self.target_epsilon = float(target_epsilon)
        self.target_delta = float(target_delta)
        self.rounds = int(rounds)
        self.dp: DifferentialPrivacyServerSideFixedClipping | None = None  # Flower's wrapper, once n is known
        self._configured: set[int] = set()  # rounds with a privacy event pending in Flower's wrapper

    def __repr__(self) -> str:
        return f"CentralDP(σ={self.noise_multiplier:.4f}, C={self.clipping_norm}, ε≤{self.target_epsilon})"

    def _build(self, num_sampled: int, server_round: int) -> DifferentialPrivacyServerSideFixedClipping:
        from flwr.serverapp import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )
        from opacus.accountants import RDPAccountant

        if self.target_delta >= 1.0 / num_sampled:
            raise ValueError(f"central DP δ={self.target_delta:g} is not below 1/{num_sampled} merchants")
        config = PrivacyConfig(
            target_delta=self.target_delta, population_size=num_sampled,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=self.target_epsilon * (1 + 1e-6),
        )
        # the same RDP orders as Opacus's, so Flower's ε and the calibration agree
        accountant = RdpAccountant(config, orders=tuple(RDPAccountant.DEFAULT_ALPHAS))
        if server_round > 1:  # a resumed run: the earlier rounds' releases were spent
            event = GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier, sample_size=num_sampled,
                                         population_size=num_sampled)
            accountant.compose(event, count=server_round - 1)
        return DifferentialPrivacyServerSideFixedClipping(self.strategy, self.noise_multiplier, self.clipping_norm,
                                                          num_sampled, accountant=accountant)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.dp is None:
            sampled = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid))
            if not sampled:
                return sampled
            self.dp = self._build(len(sampled), server_round)
        elif server_round in self._configured:
            # a retried round released nothing: Flower's wrapper drops its pending event on an empty aggregation
            self.dp.aggregate_train(server_round, [])
        messages = list(self.dp.configure_train(server_round, arrays, config, grid))
        self._configured.add(server_round)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.dp is None:
            return None, None
        self._configured.discard(server_round)
        arrays, metrics = self.dp.aggregate_train(server_round, replies)
        spent = self.dp.privacy_spent()
        if arrays is not None and spent is not None:
            metrics = MetricRecord({**(dict(metrics) if metrics else {}),
                                    "central-epsilon": float(spent.epsilon), "central-delta": float(spent.delta),
                                    "central-noise-multiplier": float(self.noise_multiplier)})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        (self.dp or self.strategy).summary()
