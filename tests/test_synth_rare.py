"""The rare-repeat marketplace mode: long-tail seller sizes and a 1-3 % repeat-purchase rate.

Calibration is computed from the generated tables, independently of the generator's constants.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fedretain.synth import marketplace_sizes, n_large_sellers, simulate

N_SELLERS, N_USERS = 200, 6_000
CUTOFF = pd.Timestamp("2026-11-01") - pd.Timedelta(days=30)


@pytest.fixture(scope="module")
def market():
    return simulate(N_SELLERS, N_USERS, seed=1, mode="rare-repeat")


def _labels(silos) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per buyer before the cutoff: bought again in the 30 days after it, purchases before, days since last."""
    y, freq, rec = [], [], []
    for s in silos:
        p = s.events[s.events["event"] == "purchase"]
        hist = p[p["ts"] < CUTOFF].groupby("user_id", observed=True)["ts"].agg(["size", "max"])
        after = set(p.loc[p["ts"] >= CUTOFF, "user_id"])
        y.append(hist.index.isin(list(after)))
        freq.append(hist["size"].to_numpy())
        rec.append(((CUTOFF - hist["max"]) / pd.Timedelta(days=1)).to_numpy())
    return np.concatenate(y), np.concatenate(freq), np.concatenate(rec)


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    ranks = pd.Series(score).rank().to_numpy()
    pos = ranks[y]
    return float((pos.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * (~y).sum()))


def test_base_rate_is_rare(market):
    y, _, _ = _labels(market)
    assert len(y) > 0.7 * N_USERS
    assert 0.01 <= y.mean() <= 0.03, y.mean()


def test_repeat_buyers_are_still_predictable(market):
    """Rare, but driven by behaviour: frequent and recent buyers come back more often."""
    y, freq, rec = _labels(market)
    assert _auc(freq, y) > 0.53 and _auc(-rec, y) > 0.57  # (most buyers bought once: ties)


def test_long_tail_of_small_sellers_and_a_few_large_ones(market):
    sizes = np.array([len(s.users) for s in market])
    assert sizes.sum() == N_USERS and list(sizes) == sorted(sizes, reverse=True) and sizes.min() >= 1
    n_large = n_large_sellers(N_SELLERS)
    assert 1 <= n_large <= 5
    assert sizes[:n_large].sum() >= 0.45 * N_USERS  # a few large sellers hold about half the customers
    small = sizes[n_large:]
    assert np.median(small) <= 15 and (small <= 5).mean() >= 0.1  # most sellers have a handful or a dozen
    assert sizes[n_large] < sizes[n_large - 1] / 3  # a clear gap between the large and the small
    ids = [s.merchant["merchant_id"] for s in market]
    assert len(set(ids)) == N_SELLERS and ids[0] == "seller_0000"
    assert {s.merchant["mode"] for s in market} == {"rare-repeat"}


def test_marketplace_sizes_edge_cases():
    rng = np.random.default_rng(0)
    assert marketplace_sizes(10, 1, rng).tolist() == [10]
    big = marketplace_sizes(40_000, 2_000, rng)
    assert big.sum() == 40_000 and big.size == 2_000 and n_large_sellers(2_000) == 5
    with pytest.raises(ValueError, match="rare-repeat"):
        marketplace_sizes(100, 80, rng)
    with pytest.raises(ValueError, match="unknown synthetic mode"):
        simulate(2, 100, mode="rare")


def test_cli_synth_rare_repeat(tmp_path):
    from fedretain.cli.data import data

    res = CliRunner().invoke(data, ["synth", "--mode", "rare-repeat", "--merchants", "12", "--users", "400",
                                    "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    folders = sorted((tmp_path / "m").iterdir())
    assert len(folders) == 12 and folders[0].name == "seller_0000"
    assert json.loads((folders[0] / "merchant.json").read_text())["mode"] == "rare-repeat"
