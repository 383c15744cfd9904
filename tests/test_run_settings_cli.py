"""`fedretain simulate` offers every run setting the ServerApp accepts, and --eval-fraction reaches the nodes.

The lists are compared, not copied: a run_config key added to ``RunSettings`` or read from its
``extra`` by a server module without a simulate option (or a pyproject default) fails here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedretain.server.settings import SERVER_EXTRA_KEYS, RunSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# run_config key -> simulate option, where the names differ
CLI_NAMES = {"num-server-rounds": "rounds", "out-dir": "out", "data-dir": "data"}


def accepted_keys() -> set[str]:
    return set(RunSettings._KEYS) | set(SERVER_EXTRA_KEYS)


def simulate_options() -> set[str]:
    from fedretain.cli.train import simulate

    return {opt[2:] for p in simulate.params for opt in p.opts if opt.startswith("--")}


def test_simulate_offers_every_run_setting_the_server_accepts():
    missing = sorted(k for k in accepted_keys() if CLI_NAMES.get(k, k) not in simulate_options())
    assert not missing, f"run_config keys without a `fedretain simulate` option: {missing}"
    assert "consent-at" not in simulate_options()  # consent is decided at each node's clock (trust issue)


def test_every_extra_key_a_server_reads_is_declared():
    pattern = re.compile(r"""(?:extra\.get\(|extra\(settings,\s*|extra\[)\s*["']([a-z0-9-]+)["']""")
    read = set()
    for folder in ("server", "fedretain/privacy"):
        for path in (ROOT / folder).rglob("*.py"):
            read |= set(pattern.findall(path.read_text(encoding="utf-8")))
    assert read, "the pattern found no extra key at all: it no longer matches the code"
    undeclared = sorted(read - set(SERVER_EXTRA_KEYS))
    assert not undeclared, f"run_config keys read from extra but not in SERVER_EXTRA_KEYS: {undeclared}"


def test_pyproject_run_config_names_exactly_the_accepted_keys():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == accepted_keys()
    settings = RunSettings.from_run_config(config)  # the shipped defaults parse and mean "auto"
    assert settings.dp_schedule == "auto" and settings.eval_fraction == 0.3


def test_eval_fraction_is_validated_with_a_clear_message(tmp_path):
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"eval-fraction .* strictly between 0 and 1"):
            RunSettings(eval_fraction=bad)
    assert RunSettings.from_run_config({"eval-fraction": "0.2"}).eval_fraction == 0.2
    from fedretain.cli import main

    res = CliRunner().invoke(main, ["simulate", "--data", str(tmp_path), "--eval-fraction", "1"])
    assert res.exit_code == 2 and "eval-fraction" in res.output and "strictly between 0 and 1" in res.output
    assert "Traceback" not in res.output and not any(tmp_path.iterdir())  # refused before any node was provisioned


def test_simulate_refuses_rounds_that_aggregate_auto_chooses(tmp_path):
    from fedretain.cli import main

    res = CliRunner().invoke(main, ["simulate", "--data", str(tmp_path), "--dp-mode", "aggregate", "--rounds", "9"])
    assert res.exit_code == 2 and "--dp-schedule fixed" in res.output


def test_eval_fraction_travels_to_the_nodes_split(synth_silos):
    from fedretain.clients import round_cache
    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.server.federation import FederatedTraining

    settings = RunSettings(eval_fraction=0.5, run_id="ef1")
    run = FederatedTraining.__new__(FederatedTraining)  # base_config reads only the settings (no grid needed)
    run.settings = settings
    cfg = run.base_config()
    assert cfg["eval-fraction"] == 0.5
    node = MerchantNode(NodeConfig.for_silo(synth_silos[0]))
    names = list(settings.features)
    half = node.prepare(settings.purpose, names, eval_fraction=0.5)
    default = node.prepare(settings.purpose, names)
    n = half.n_train + half.n_test
    assert n == default.n_train + default.n_test
    assert abs(half.n_test / n - 0.5) < 0.05 and abs(default.n_test / n - 0.3) < 0.05
    assert set(default.test_users) <= set(half.test_users)  # the same per-user hash, a larger threshold
    assert not set(half.train_users) & set(half.test_users)
    # the node's per-run cache keys on the fraction: another fraction is another split
    assert round_cache.run_key(node, cfg) != round_cache.run_key(node, {**cfg, "eval-fraction": 0.3})
    with pytest.raises(ValueError, match="eval-fraction must be strictly between 0 and 1"):
        node.prepare(settings.purpose, names, eval_fraction=1.0)
    assert np.isfinite(half.x_train).all()
