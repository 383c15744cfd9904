"""A node's model inputs, computed once per run and reused while its consent and data are unchanged.

Every round of a run asks a node for the same thing: the features and labels of the users
its consent gate admits for the run's purpose. Re-ingesting the silo and recomputing
features each round made a node's per-round cost independent of whether anything changed
(issue 14: ≈ 0.3 CPU-s per merchant-round beside Flower's 0.03).

What is reused, and when (the consent decision itself is *never* reused across rounds):

* Within one round (``server-round``), the train and evaluate messages of a run share one
  :class:`Prepared` — consent is decided once per round, as before.
* At every new round the node decides consent again at its own clock
  (:meth:`MerchantNode.decide`: the incremental ledger verify of
  :mod:`fedretain.consent.incremental` — the full verify ran at the run's first decision —
  and a replay of the ledger for the purpose). The previous round's features are reused
  only if the silo's data stamp, the run, purpose, features, horizon and cutoff are the same
  *and* the new decision admits exactly the same users with exactly the same scopes
  (``DataFrame.equals`` on the grants, no hash); the reused :class:`Prepared` carries the
  new decision, so lineage and usage records name the ledger head of this round.
  Anything else — a withdrawal, an expiry, a new grant, a changed silo file — recomputes.

The grants are compared rather than only the ledger head (size and root, which the decision
also carries): a grant can expire between rounds with nothing appended, and a record appended
for another purpose or for a user of no silo changes the head without changing the inputs.
Everything the features depend on is the silo (stamp) and the grants (the gate keeps a user's
events and attributes by the scopes granted, and nothing else).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from datetime import datetime
from typing import Any

from fedretain.clients.node import TEST_FRACTION, MerchantNode, Prepared

__all__ = ["CACHE_SIZE", "clear", "prepared_for", "stats"]

CACHE_SIZE = 4096  # runs x merchants kept per process (a simulation worker serves many merchants)

_BY_ROUND: OrderedDict[tuple, Prepared] = OrderedDict()  # (run key, round) -> this round's inputs
_BY_RUN: OrderedDict[tuple, Prepared] = OrderedDict()  # run key -> the latest round's inputs
_STATS = {"round_hits": 0, "reused": 0, "computed": 0}


def _put(cache: OrderedDict[tuple, Prepared], key: tuple, prep: Prepared) -> None:
    cache[key] = prep
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def run_key(node: MerchantNode, cfg: Any) -> tuple:
    """What a node's inputs depend on besides consent: its silo's content, the run and the features asked."""
    return (str(node.config.data_path), node.data_stamp(), str(node.config.consent_db),
            str(cfg.get("run-id", "") or ""), str(cfg["purpose"]), tuple(str(f) for f in cfg["features"]),
            float(cfg.get("horizon-days", 30)), str(cfg.get("cutoff", "") or ""),
            float(cfg.get("eval-fraction", TEST_FRACTION)))


def prepared_for(node: MerchantNode, cfg: Any, at: datetime) -> Prepared:
    """The node's inputs for the message config ``cfg``, with consent decided at ``at`` (see module doc)."""
    key = run_key(node, cfg)
    rnd = cfg.get("server-round")
    if rnd is not None and (key, int(rnd)) in _BY_ROUND:
        _STATS["round_hits"] += 1
        return _BY_ROUND[(key, int(rnd))]
    run_id, purpose = key[3], key[4]
    decision = node.decide(purpose, at=at, run_id=run_id)  # every round: fails closed, incremental verify
    previous = _BY_RUN.get(key)
    if previous is not None and previous.decision.grants.equals(decision.grants):
        prep = dataclasses.replace(previous, decision=decision)
        _STATS["reused"] += 1
    else:
        prep = node.prepare(purpose=purpose, feature_names=list(key[5]), horizon_days=key[6],
                            cutoff=key[7] or None, at=at, run_id=run_id, decision=decision, eval_fraction=key[8])
        _STATS["computed"] += 1
    _put(_BY_RUN, key, prep)
    if rnd is not None:
        _put(_BY_ROUND, (key, int(rnd)), prep)
    return prep


def stats() -> dict[str, int]:
    """How often this process reused inputs (round_hits: same round; reused: later round, same consent)."""
    return dict(_STATS)


def clear() -> None:
    _BY_ROUND.clear()
    _BY_RUN.clear()
    for k in _STATS:
        _STATS[k] = 0
