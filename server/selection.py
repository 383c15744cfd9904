"""Model choice on the merchants' validation users, federated (``model = "auto"``, issue 12).

Before the run proper, each candidate (logistic regression and the MLP, at each of the
``selection-learning-rates``) is trained for ``selection-rounds`` federated rounds on every
node's training users *less a validation share* and evaluated on that validation share
(``data-view selection``, ``clients/node.py:data_view``): never on the held-out test users, so
the test metrics of the final model stay an honest estimate. The comparison uses the pooled
held-out metric the run reports (``server.federation.evaluation_metrics``: AUC from the summed
score histograms, not a mean of per-node AUCs), goes into ``run.json`` under
``model_selection``, and the best candidate is trained in full:

* with ``refit``: on all of each node's non-test users (training + validation);
* without: on the same users the candidates saw (``data-view train-minus-validation``).

Only ``dp-mode none``: every candidate trains on the data, and in a DP mode each would have to
be reserved and charged in the nodes' budget ledgers (not done yet; the settings refuse it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from fedretain.models import Standardizer, make_model
from fedretain.protocol import EVALUATE_RECEIVED, model_arrays
from fedretain.server.federation import (
    FederatedTraining,
    RunAborted,
    evaluation_metrics,
    read_evaluations,
    send_and_receive,
)
from fedretain.server.run_record import RunRecord
from fedretain.server.settings import RunSettings

log = logging.getLogger("fedretain.server")

CANDIDATE_KINDS = ("logreg", "mlp")
REPORTED = ("auc", "auc-low", "auc-high", "log_loss", "num-examples")


def candidates(s: RunSettings) -> list[dict[str, Any]]:
    """The (model, hidden, learning rate) grid the selection phase trains."""
    rates = s.selection_learning_rates or (s.learning_rate,)
    return [{"model": kind, "hidden": list(s.hidden) if kind == "mlp" else [], "learning_rate": float(lr)}
            for kind in CANDIDATE_KINDS for lr in rates]


def best_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest pooled validation AUC; ties (and missing AUCs) go to the lower log loss, then the simpler model."""
    def key(r: dict[str, Any]) -> tuple[float, float]:
        v = r["validation"]
        auc, loss = v.get("auc"), v.get("log_loss")
        return (-(auc if isinstance(auc, float) and math.isfinite(auc) else -1.0),
                loss if isinstance(loss, float) and math.isfinite(loss) else math.inf)

    return min(results, key=key)  # min() keeps the first of equals: logreg is listed first


class SelectingTraining(FederatedTraining):
    """A run with ``model auto``: the selection phase, then the chosen model's run (the parent's loop)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.selection: dict[str, Any] | None = None
        self.final_view = ""

    def base_config(self) -> dict[str, Any]:
        return {**super().base_config(), "data-view": self.final_view,
                "validation-fraction": float(self.settings.validation_fraction)}

    def run(self) -> RunRecord:
        if self.settings.model == "auto":
            previous = self._previous_selection() if self.settings.resume else None
            if previous is not None:  # a resumed run keeps the model it chose (and trains on the same users)
                self._choose(previous)
            else:
                self.select()
        return super().run()

    def _previous_selection(self) -> dict[str, Any] | None:
        if not (self.out_dir / RunRecord.FILENAME).is_file():
            return None
        return RunRecord.load(self.out_dir).data.get("model_selection")

    def _choose(self, selection: dict[str, Any]) -> None:
        s, chosen = self.settings, selection["chosen"]
        # refit is carried out through final_view; the settings now describe the chosen model's run
        self.settings = dataclasses.replace(s, model=chosen["model"], learning_rate=float(chosen["learning_rate"]),
                                            hidden=tuple(chosen["hidden"]) or s.hidden, refit=False)
        self.final_view = "" if selection["refit"] else "train-minus-validation"
        self.selection = selection

    def _start_or_resume(self) -> tuple[RunRecord, ArrayRecord, Standardizer, int]:
        out = super()._start_or_resume()
        if self.selection is not None:
            out[0].data["model_selection"] = self.selection
            out[0].data["config"].update(model_requested="auto", refit=bool(self.selection["refit"]))
            out[0].save()
        return out

    def select(self) -> None:
        """Train and compare every candidate on the validation users; switch the settings to the best."""
        s = self.settings
        self.wait_for_nodes(s.min_nodes)
        results = [self._try(c) for c in candidates(s)]
        chosen = best_of(results)
        self._choose({
            "criterion": "pooled AUC on the nodes' validation users (exact in dp-mode none); ties: log loss",
            "validation_fraction": s.validation_fraction, "selection_rounds": s.selection_rounds,
            "candidates": results, "chosen": {k: chosen[k] for k in ("model", "hidden", "learning_rate")},
            "refit": s.refit,
            "final_training_users": "all non-test users (training + validation: refit)" if s.refit else
            "training users less the validation share (the candidates' users)",
        })
        assert self.selection is not None
        log.info("model selection: %s", self.selection["chosen"])

    def _try(self, cand: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        torch.manual_seed(s.seed)
        model = make_model(cand["model"], len(self.columns), tuple(cand["hidden"]), s.prior_rate)
        arrays: ArrayRecord = model_arrays(model.state_dict())
        # its own run id: the nodes' usage records tell the selection's reads from the run's
        base = {**super().base_config(), "hidden": cand["hidden"], "data-view": "selection",
                "validation-fraction": float(s.validation_fraction), "run-id": f"{s.run_id}.select"}
        train_cfg = ConfigRecord({**base, "local-epochs": s.local_epochs, "batch-size": s.batch_size,
                                  "learning-rate": cand["learning_rate"], "proximal-mu": s.proximal_mu,
                                  EVALUATE_RECEIVED: False})
        for rnd in range(1, s.selection_rounds + 1):
            messages = list(self.strategy.configure_train(rnd, arrays, train_cfg, self.grid))
            replies = [r for r in send_and_receive(self.grid, messages, s.round_timeout)
                       if r.metadata.message_type == MessageType.TRAIN]
            ok = sum(not r.has_error() for r in replies)
            if ok < s.min_nodes:
                raise RunAborted(f"model selection ({cand['model']}, lr {cand['learning_rate']:g}) round {rnd}: "
                                 f"only {ok} node(s) answered (minimum {s.min_nodes})")
            new, _ = self.strategy.aggregate_train(rnd, replies)
            if new is None:
                raise RunAborted(f"model selection round {rnd}: aggregation produced no model")
            arrays = new
        messages = self._evaluate_messages(list(self.grid.get_node_ids()), s.selection_rounds, arrays,
                                           ConfigRecord(base))
        _, records = read_evaluations(send_and_receive(self.grid, messages, s.round_timeout))
        metrics = evaluation_metrics(records)
        return {**cand, "validation": {k: metrics[k] for k in REPORTED if k in metrics}, "nodes": len(records)}
