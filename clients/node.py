"""A merchant node: its silo, its consent ledger, and the one-way path to model inputs.

silo → ``fedretain.ingest`` → consent gate (re-evaluated every round) → features/labels →
train/test split of the node's own users. Nothing here talks to Flower; the ClientApp
turns messages into calls on :class:`MerchantNode`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedretain.consent.gate import ConsentError, GateDecision, apply_gate, decide
from fedretain.consent.identity import KEY_FILE, LEDGER_FILE, NODE_DIR, PIN_FILE, PinError, require_pin
from fedretain.consent.incremental import IncrementalLedger
from fedretain.consent.ledger import ConsentLedger, LedgerError
from fedretain.consent.vocab import check_purpose
from fedretain.features import check_features, compute_features, feature_columns, scopes_read
from fedretain.ingest import Silo, load_silo
from fedretain.labels import LABEL_SCOPE, make_labels
from fedretain.train import to_targets

__all__ = ["NODE_DIR", "NodeConfig", "MerchantNode", "Prepared", "data_view", "simulation_silos", "split_test"]
TEST_FRACTION = 0.3
_SPLIT_KEY = "fedretain-split1"  # exactly 16 bytes: pandas hash key


@dataclass(frozen=True)
class NodeConfig:
    """Where a merchant node finds its data, ledger, key and state (from Flower's node_config)."""

    data_path: Path
    consent_db: Path
    node_key: Path
    state_dir: Path

    @classmethod
    def for_silo(cls, silo: str | Path, consent_db: str | Path | None = None, node_key: str | Path | None = None,
                 state_dir: str | Path | None = None) -> NodeConfig:
        silo = Path(silo)
        state = Path(state_dir) if state_dir else silo / NODE_DIR
        return cls(
            data_path=silo,
            consent_db=Path(consent_db) if consent_db else state / LEDGER_FILE,
            node_key=Path(node_key) if node_key else state / KEY_FILE,
            state_dir=state,
        )

    @property
    def pin_path(self) -> Path:
        """The node's pinned identity (merchant id + ledger key), written at provisioning."""
        return self.state_dir / PIN_FILE

    @classmethod
    def from_flower(cls, node_config: dict[str, Any], run_config: dict[str, Any]) -> NodeConfig:
        """Deployment: ``data-path`` etc. in node_config. Simulation: partition-id → one silo."""
        if "data-path" in node_config:
            return cls.for_silo(
                str(node_config["data-path"]),
                node_config.get("consent-db") or None,
                node_config.get("node-key") or None,
                node_config.get("state-dir") or None,
            )
        if "partition-id" in node_config:
            silos = simulation_silos(str(run_config.get("data-dir", "")))
            pid = int(node_config["partition-id"])
            if pid >= len(silos):
                raise RuntimeError(f"simulation node {pid} has no silo: only {len(silos)} found")
            return cls.for_silo(silos[pid])
        raise RuntimeError("node_config names no data: start the node with --node-config 'data-path=\"SILO\"'")


def simulation_silos(data_dir: str = "") -> list[Path]:
    """Silo folders of a simulation, in partition order (env FEDRETAIN_SIM_DATA_DIR or run_config)."""
    root = data_dir or os.environ.get("FEDRETAIN_SIM_DATA_DIR", "")
    if not root:
        raise RuntimeError("simulation needs a data folder: set run_config data-dir or FEDRETAIN_SIM_DATA_DIR")
    silos = list(_silos_listed(root, Path(root).stat().st_mtime_ns))
    if not silos:
        raise RuntimeError(f"no merchant silos (folders with merchant.json) under {root}")
    return silos


@functools.lru_cache(maxsize=8)
def _silos_listed(root: str, mtime_ns: int) -> tuple[Path, ...]:
    """The listing behind :func:`simulation_silos`, once per process while the folder's entries are
    unchanged (its mtime moves when a silo is added or removed): every message of a simulation asks for
    it, and listing 1,000 silos per message made each message's cost grow with the federation."""
    return tuple(sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / "merchant.json").is_file()))


# A simulation worker serves many merchants in turn: with room for only a few silos it re-ingested
# every merchant every round. A deployed node has one silo, so the bound matters only in simulation.
SILO_CACHE_SIZE = 2048


@functools.lru_cache(maxsize=SILO_CACHE_SIZE)
def _load_silo_cached(path: str, mtime_ns: int) -> Silo:
    return load_silo(path)


def silo_stamp(path: Path) -> int:
    """The latest mtime (ns) of the silo's files: what says its data changed."""
    return max((p.stat().st_mtime_ns for p in Path(path).iterdir() if p.is_file()), default=0)


def load_silo_cached(path: Path) -> Silo:
    """Ingest once per process (and again only if the silo folder changed)."""
    return _load_silo_cached(str(path), silo_stamp(path))


@dataclass
class Prepared:
    """Model inputs of one round on one node, with the consent decision that admitted them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    columns: list[str]
    decision: GateDecision
    cutoff: pd.Timestamp
    train_users: pd.Index
    test_users: pd.Index
    granted: pd.DataFrame  # scopes granted by the examples (index user_id)

    @property
    def used_users(self) -> pd.Index:
        return self.train_users.append(self.test_users)

    def usage(self, phase: str) -> tuple[pd.Index, dict[str, int]]:
        """Users whose data a phase reads (train: training users; evaluate: held-out users) and per-scope counts."""
        users = self.train_users if phase == "train" else self.test_users if phase == "evaluate" else self.used_users
        g = self.granted.loc[users]
        return users, {s: int(g[s].sum()) for s in self.granted.columns}

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)


def split_test(user_ids: pd.Index, merchant_id: str, fraction: float = TEST_FRACTION) -> np.ndarray:
    """Deterministic per-user held-out mask (same users held out every round and run)."""
    keys = pd.Series(merchant_id + ":" + pd.Index(user_ids).astype(str), dtype=object)
    h = pd.util.hash_pandas_object(keys, index=False, hash_key=_SPLIT_KEY).to_numpy()
    return (h % 10_000) < int(fraction * 10_000)


DATA_VIEWS = ("", "selection", "train-minus-validation")


def data_view(prep: Prepared, merchant_id: str, view: str, validation_fraction: float) -> Prepared:
    """The users a phase of a run with model selection trains and evaluates on (``data-view``).

    ``selection``: train on the training users less a validation share, evaluate on that share (never on
    the held-out test users); ``train-minus-validation``: the final model of a run without refit trains on
    the same users as the candidates and is evaluated on the test users; ``""``: every non-test user.
    """
    if view not in DATA_VIEWS:
        raise ValueError(f"unknown data-view {view!r}; expected one of {DATA_VIEWS}")
    if not view:
        return prep
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation-fraction must be strictly between 0 and 1, got {validation_fraction}")
    val = split_test(prep.train_users, merchant_id + "/validation", validation_fraction)
    kept = dict(x_train=prep.x_train[~val], y_train=prep.y_train[~val], train_users=prep.train_users[~val])
    if view == "selection":
        kept.update(x_test=prep.x_train[val], y_test=prep.y_train[val], test_users=prep.train_users[val])
    return dataclasses.replace(prep, **kept)


class MerchantNode:
    """One merchant's node: consent-gated features and labels from its own silo."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config

    @property
    def silo(self) -> Silo:
        return load_silo_cached(self.config.data_path)

    def data_stamp(self) -> int:
        """Changes when any file of the silo changes (the key of the per-run input cache)."""
        return silo_stamp(self.config.data_path)

    @property
    def merchant_id(self) -> str:
        return str(self.silo.merchant.get("merchant_id", self.config.data_path.name))

    def data_end(self) -> pd.Timestamp:
        end = self.silo.merchant.get("data_end")
        if end:
            return pd.Timestamp(end) + pd.Timedelta(days=1)  # data_end is inclusive (a whole day)
        return self.silo.events["ts"].max().normalize() + pd.Timedelta(days=1)

    def training_cutoff(self, horizon_days: float, cutoff: str | None = None) -> pd.Timestamp:
        """The cutoff whose label window ends at the end of the data, unless set explicitly."""
        if cutoff:
            return pd.Timestamp(cutoff)
        return self.data_end() - pd.Timedelta(days=float(horizon_days))

    def ledger(self) -> ConsentLedger:
        """The node's consent ledger, trusted only under the node's pinned key (:mod:`fedretain.consent.identity`).

        A ledger declaring another key or merchant, a missing or damaged pin, or a ledger
        that cannot be opened raises :class:`ConsentError` naming the file: the node uses no data.
        """
        db = self.config.consent_db
        if not db.is_file():
            raise FileNotFoundError(
                f"consent ledger not found at {db}: refusing to use any data (provision the node with "
                f"`fedretain.clients.provision.provision_node` / `fedretain simulate`, which creates the ledger "
                f"from SILO/consent.csv and pins the node key; do not create an empty ledger beside a real one)"
            )
        try:
            return ConsentLedger.open(db, pinned=require_pin(self.config.state_dir, db))
        except (PinError, LedgerError) as exc:
            raise ConsentError(f"consent gate refused: {exc}") from None

    def gate(self, purpose: str, at: datetime | None = None, run_id: str = "") -> tuple[GateDecision, Any]:
        """Consent decision for ``purpose`` at ``at`` (default: now) and the gated data. Fails closed.

        ``at`` is for the node's own local use (back-tests, benches); what the platform sends
        never reaches it: the ClientApp always passes the node's clock (``client_app._consent_time``).
        With a ``run_id`` the ledger is verified in full at the run's first decision and only in
        its appended records afterwards (``fedretain.consent.incremental``).
        """
        decision = self.decide(purpose, at, run_id)
        silo = self.silo
        return decision, apply_gate(decision, silo.events, silo.users)

    def decide(self, purpose: str, at: datetime | None = None, run_id: str = "") -> GateDecision:
        """The consent decision alone (see :meth:`gate`): verify the ledger, replay it for ``purpose``."""
        check_purpose(purpose)
        at = at or datetime.now(timezone.utc)
        silo = self.silo
        candidates = pd.Index(silo.events["user_id"].unique()).union(pd.Index(silo.users["user_id"]))
        with self.ledger() as ledger:
            checked = IncrementalLedger(ledger, self.config.state_dir, run_id) if run_id else ledger
            return decide(checked, purpose, at, candidates)

    def prepare(
        self,
        purpose: str,
        feature_names: list[str],
        horizon_days: float = 30,
        cutoff: str | None = None,
        at: datetime | None = None,
        run_id: str = "",
        decision: GateDecision | None = None,
        eval_fraction: float = TEST_FRACTION,
    ) -> Prepared:
        """Features and labels of the users who may be used now, split into train/test.

        Examples are users the gate admitted for ``purpose`` who also granted the label's
        scope and bought at least once before the cutoff (retention of existing buyers).
        ``decision``: one just taken by :meth:`decide` for ``purpose`` (the per-run cache decides
        first, then computes only if the admitted users changed); default: decide now.
        ``eval_fraction``: share of the users held out for evaluation (the run's ``eval-fraction``).
        """
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval-fraction must be strictly between 0 and 1, got {eval_fraction}")
        names = list(check_features(feature_names))
        if decision is None:
            decision, gated = self.gate(purpose, at, run_id)
        else:
            if decision.purpose != purpose:
                raise ConsentError(f"a consent decision for {decision.purpose!r} cannot admit data for {purpose!r}")
            gated = apply_gate(decision, self.silo.events, self.silo.users)
        cut = self.training_cutoff(horizon_days, cutoff)
        feats = compute_features(gated, cut, names)
        grants = decision.grants.reindex(feats.index).fillna(False)
        buyers = gated.events.loc[
            (gated.events["event"] == "purchase") & (gated.events["ts"] < cut), "user_id"
        ].unique()
        keep = grants[LABEL_SCOPE].to_numpy(bool) & feats.index.isin(buyers)
        feats = feats[keep]
        labels = make_labels(gated.events, feats.index, cut, horizon_days)
        y = to_targets(labels["repurchase"].to_numpy(), labels["spend"].to_numpy())
        x = feats[feature_columns(names)].to_numpy(np.float64)
        test = split_test(feats.index, self.merchant_id, eval_fraction)
        return Prepared(
            x_train=x[~test], y_train=y[~test], x_test=x[test], y_test=y[test],
            columns=feature_columns(names), decision=decision, cutoff=cut,
            train_users=feats.index[~test], test_users=feats.index[test],
            granted=grants.loc[feats.index, list(scopes_read(names))].astype(bool),
        )
