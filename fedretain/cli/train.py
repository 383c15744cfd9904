"""``fedretain simulate`` and ``fedretain score``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)


def _fmt(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def round_table(rounds: list[dict[str, Any]]) -> Table:
    """The per-round table people read: example-weighted metrics on held-out users."""
    table = Table(title="Federated rounds (held-out users, example-weighted)")
    for col in ("round", "nodes", "train loss", "AUC", "log loss", "ECE", "LTV ρ", "users used", "ε"):
        table.add_column(col, justify="right")
    for r in rounds:
        ev, tr = r.get("evaluate", {}), r.get("train", {})
        nodes = [n for n in r.get("nodes", []) if n["phase"] == "train"]
        ok = sum(1 for n in nodes if not n.get("error"))
        eps = [n.get("epsilon") for n in nodes if n.get("epsilon") is not None]
        table.add_row(
            str(r["round"]), f"{ok}/{len(nodes)}", _fmt(tr.get("train_loss")), _fmt(ev.get("auc")),
            _fmt(ev.get("log_loss")), _fmt(ev.get("ece")), _fmt(ev.get("ltv_spearman"), 3),
            str(sum(int(n.get("metrics", {}).get("users-used", 0)) for n in nodes)),
            _fmt(max(eps), 2) if eps else "–",
        )
    return table


class RichRoundObserver:
    """Progress bar over rounds, then the round table."""

    def __init__(self, merchants: int = 0) -> None:
        self.merchants = merchants  # shown as "k/N merchants trained" per round (issue 14)
        self.trained: dict[int, str] = {}
        self.progress = Progress(
            TextColumn("[bold]federated training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
        )
        self.task: Any = None

    def on_start(self, run_id: str, total_rounds: int, first_round: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=total_rounds, completed=first_round - 1, status="")

    def on_round_trained(self, entry: dict[str, Any]) -> None:
        nodes = [n for n in entry.get("nodes", []) if n.get("phase") == "train"]
        done = sum(1 for n in nodes if not n.get("error"))
        self.trained[entry["round"]] = f"{done}/{self.merchants or len(nodes)} merchants trained"
        self.progress.update(self.task, status=f"round {entry['round']}: {self.trained[entry['round']]}")

    def on_round(self, entry: dict[str, Any]) -> None:
        auc = entry.get("evaluate", {}).get("auc")
        self.progress.update(self.task, completed=entry["round"],
                             status=f"round {entry['round']}: {self.trained.get(entry['round'], '')} AUC {_fmt(auc)}")

    def on_end(self, status: str, record: dict[str, Any]) -> None:
        self.progress.stop()


def ensure_nodes(data_dir: Path, lifetime_budgets: dict[str, float] | None = None) -> list[Path]:
    """Give every silo a node state folder (key + consent ledger from its consent.csv) if it lacks one."""
    from fedretain.clients.node import simulation_silos
    from fedretain.clients.provision import provision_node
    from fedretain.consent.identity import PinError

    silos = simulation_silos(str(data_dir))
    for silo in silos:
        try:
            provision_node(silo, lifetime_budgets=lifetime_budgets)
        except PinError as exc:  # an unpinned or re-keyed node: the operator decides, nothing starts
            raise click.ClickException(str(exc)) from None
    return silos


def _hidden(ctx: Any, param: Any, value: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"hidden layer widths are comma-separated integers (e.g. 64,32), got {value!r}") \
            from None
    if any(w < 1 for w in widths):
        raise click.BadParameter(f"hidden layer widths must be >= 1, got {value!r}")
    return widths


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers (e.g. 0.01,0.03), got {value!r}") from None


# simulate options that are run_config keys the servers read from RunSettings.extra (server/settings.py
# SERVER_EXTRA_KEYS): passed on only when set, so the servers' own defaults apply otherwise
_EXTRA_OPTIONS = ("dp_accountant", "dp_clipping", "secure_aggregation", "aggregate_batch_size", "aggregate_population",
                  "server_learning_rate", "eval_epsilon", "secagg_num_shares", "secagg_reconstruction_threshold",
                  "witness_db")


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of merchant silos (one virtual node each).")
@click.option("--rounds", default=None, type=click.IntRange(1),
              help="Federated rounds [default: 5; with --dp-mode aggregate and --dp-schedule auto: chosen from the "
                   "declared population].")
@click.option("--strategy", type=click.Choice(["fedavg", "fedprox"]), default="fedavg", show_default=True)
@click.option("--model", type=click.Choice(["mlp", "logreg", "auto"]), default="mlp", show_default=True,
              help="mlp: small neural network (layers --hidden); logreg: logistic regression (no hidden layers); "
                   "auto: both compared first on the merchants' validation users (dp-mode none).")
@click.option("--validation-fraction", default=0.2, show_default=True, type=float,
              help="--model auto: share of each merchant's training users the candidates are compared on.")
@click.option("--selection-rounds", default=2, show_default=True, type=click.IntRange(1),
              help="--model auto: federated rounds per candidate.")
@click.option("--selection-learning-rates", default="", callback=lambda c, p, v: _floats(v),
              help="--model auto: comma-separated learning rates to compare (default: --learning-rate).")
@click.option("--refit", is_flag=True,
              help="--model auto: train the chosen model on all non-test users (training + validation).")
@click.option("--hidden", default="64,32", show_default=True, callback=_hidden,
              help="MLP hidden layer widths, comma-separated (ignored by logreg).")
@click.option("--prior-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Start the model at this repeat-purchase rate (e.g. 0.02 when few buyers come back); 0: at 0.5.")
@click.option("--proximal-mu", default=0.0, show_default=True, type=float, help="FedProx μ (needs --strategy fedprox).")
@click.option("--local-epochs", default=2, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1),
              help="Local batch (local DP with --dp-schedule auto: sized per silo instead).")
@click.option("--learning-rate", default=0.01, show_default=True, type=float)
@click.option("--purpose", default="retention_modeling", show_default=True)
@click.option("--horizon-days", default=30.0, show_default=True, type=float)
@click.option("--cutoff", default="", help="Feature cutoff (ISO date); default: data end − horizon per merchant.")
@click.option("--features", default="", help="Comma-separated feature names (default: all registered).")
@click.option("--eval-fraction", default=0.3, show_default=True, type=float,
              help="Share of each merchant's users held out for evaluation (never trained on), 0 < f < 1.")
@click.option("--min-nodes", default=2, show_default=True, type=click.IntRange(1))
@click.option("--fraction-train", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of the connected nodes sampled for training each round.")
@click.option("--round-timeout", default=600.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a round waits for replies.")
@click.option("--node-wait-timeout", default=120.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds to wait for --min-nodes nodes.")
@click.option("--round-retries", default=1, show_default=True, type=click.IntRange(0),
              help="Retries of a round that got too few replies.")
@click.option("--dp-mode", type=click.Choice(["none", "local", "central", "aggregate"]), default="none",
              show_default=True)
@click.option("--dp-schedule", type=click.Choice(["auto", "fixed"]), default="auto", show_default=True,
              help="auto: DP batch (and aggregate rounds) fitted to the data (docs/PRIVACY.md); fixed: as given.")
@click.option("--target-epsilon", default=3.0, show_default=True, type=float, help="ε of this run (DP modes).")
@click.option("--target-delta", default=0.0, show_default=True, type=float, help="0: below 1/n per merchant.")
@click.option("--eval-epsilon", default=None, type=float,
              help="DP modes: ε of the held-out evaluation release [default: 10% of --target-epsilon].")
@click.option("--max-grad-norm", default=10.0, show_default=True, type=float, help="DP clipping norm.")
@click.option("--dp-accountant", type=click.Choice(["rdp", "prv"]), default="rdp", show_default=True)
@click.option("--dp-clipping", type=click.Choice(["bk", "ghost"]), default="bk", show_default=True,
              help="bk: fast clipped-gradient sum for Linear models; ghost: Opacus ghost clipping.")
@click.option("--secure-aggregation", is_flag=True, help="SecAgg+ (required by --dp-mode aggregate).")
@click.option("--aggregate-batch-size", default=None, type=click.IntRange(1),
              help="Aggregate mode: expected customers per step [default: chosen from the population with "
                   "--dp-schedule auto, 4096 with fixed].")
@click.option("--server-learning-rate", default=None, type=float, help="Aggregate mode: server step size.")
@click.option("--secagg-num-shares", default=None, type=float, help="SecAgg+ shares (fraction of nodes, default 1.0).")
@click.option("--secagg-reconstruction-threshold", default=None, type=float,
              help="SecAgg+ reconstruction threshold (fraction, default 0.7).")
@click.option("--max-merchants-per-person", default=1, show_default=True, type=click.IntRange(1),
              help="The platform's declared bound k: person-level ε is reported (and capped) for it.")
@click.option("--person-epsilon-cap", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Refuse a DP run whose ε for a person at up to k merchants exceeds this (0: no cap).")
@click.option("--aggregate-population", default=None, type=int,
              help="Aggregate mode: declared (public) number of customers over all merchants.")
@click.option("--lifetime-epsilon", default=None, type=float,
              help="Set this lifetime budget for the purpose on nodes that have none yet (DP runs need one).")
@click.option("--out", "out_dir", default="runs/latest", show_default=True, type=click.Path(path_type=Path))
@click.option("--run-id", default=None, help="Run id [default: a new one].")
@click.option("--resume", is_flag=True, help="Resume the run in --out from its last checkpoint.")
@click.option("--witness-db", default=None, help="The platform's ledger-witness database [default: beside the run].")
@click.option("--seed", default=0, show_default=True, type=int)
def simulate(data_dir: Path, out_dir: Path, **opts: Any) -> None:
    """Federated training over local silos in Flower's Simulation Engine."""
    from fedretain.server import progress
    from fedretain.server.secagg import wants_secure_aggregation
    from fedretain.server.settings import RunSettings
    from fedretain.server.simulation import run_in_simulation

    features = tuple(f.strip() for f in opts.pop("features").split(",") if f.strip())
    extra = {k.replace("_", "-"): v for k in _EXTRA_OPTIONS if (v := opts.pop(k)) is not None}
    lifetime = opts.pop("lifetime_epsilon")
    if opts["run_id"] is None:
        opts.pop("run_id")
    if opts["rounds"] is not None and opts["dp_mode"] == "aggregate" and opts["dp_schedule"] == "auto":
        raise click.UsageError("with --dp-mode aggregate and --dp-schedule auto the rounds are chosen from the "
                               "declared population; add --dp-schedule fixed to set --rounds yourself")
    opts["rounds"] = opts["rounds"] or 5
    try:
        settings = RunSettings(out_dir=str(out_dir), extra=extra, **({"features": features} if features else {}),
                               **opts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        secure = wants_secure_aggregation(settings)  # dp-mode aggregate always runs under SecAgg+
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    silos = ensure_nodes(data_dir, {settings.purpose: lifetime} if lifetime is not None else None)
    from fedretain.cli.preflight import check_or_exit

    check_or_exit(settings, silos, console)  # budgets (and person-level ε) before Ray/Flower start (issue 13)
    print_dp_schedule(settings, silos)
    observer = RichRoundObserver(len(silos))
    progress.add_observer(observer)
    try:
        if secure:
            from fedretain.server.secagg import run_secagg_simulation

            run_dir = run_secagg_simulation(settings, data_dir)
        else:
            run_dir = run_in_simulation(settings, data_dir)
    finally:
        progress.remove_observer(observer)
    record = json.loads((run_dir / "run.json").read_text())
    if record.get("model_selection"):
        console.print(selection_table(record["model_selection"]))
    console.print(round_table(record["rounds"]))
    console.print(f"run record: {run_dir / 'run.json'}   global model: {run_dir / 'model.pt'}")
    if record["status"] != "completed":
        sys.exit(1)


def selection_table(selection: dict[str, Any]) -> Table:
    """``--model auto``: the candidates compared on the merchants' validation users, the chosen one marked."""
    chosen = selection["chosen"]
    table = Table(title=f"Model selection on validation users ({selection['selection_rounds']} round(s) each; "
                        f"final model trained on {selection['final_training_users']})")
    for col in ("model", "learning rate", "validation AUC", "95% interval", "log loss", "chosen"):
        table.add_column(col, justify="left" if col in ("model", "chosen") else "right")
    for c in selection["candidates"]:
        v = c["validation"]
        interval = f"[{_fmt(v.get('auc-low'), 3)}, {_fmt(v.get('auc-high'), 3)}]" if "auc-low" in v else "–"
        mark = "✓" if (c["model"], c["learning_rate"]) == (chosen["model"], chosen["learning_rate"]) else ""
        table.add_row(c["model"], f"{c['learning_rate']:g}", _fmt(v.get("auc")), interval, _fmt(v.get("log_loss")),
                      mark)
    return table


def print_dp_schedule(settings: Any, silos: list[Path]) -> None:
    """Show the DP schedule the run will use, and its warnings, before anything starts.

    Aggregate mode: the server's own choice for the declared population (the same function).
    Local mode with ``dp-schedule auto``: each silo's batch and sampling rate, with a note for
    tiny silos (a simulation's operator holds every silo; deployed nodes keep their counts).
    """
    if settings.dp_mode == "aggregate":
        from fedretain.server.secagg import aggregate_schedule

        try:
            s = aggregate_schedule(settings)
        except ValueError as exc:
            raise click.ClickException(f"DP run refused before starting the simulation: {exc}") from None
        console.print(f"aggregate DP schedule: N={s.population}, expected batch {s.expected_batch:g} "
                      f"({s.batch_chosen_by}), q={s.sample_rate:.4g}, {s.rounds} rounds ({s.rounds_chosen_by}), "
                      f"σ={s.noise_multiplier:.3f}")
        for warning in s.warnings:
            console.print(f"[bold yellow]warning:[/] {warning}")
    elif settings.dp_mode == "local" and settings.dp_schedule == "auto":
        from fedretain.cli.preflight import training_records
        from fedretain.privacy.schedule import local_batch_size, local_schedule_note

        count = training_records(settings)
        table = Table(title="Local DP batches, sized per silo (dp-schedule auto)")
        for col in ("silo", "training users", "batch", "sampling rate", "note"):
            table.add_column(col, justify="left" if col in ("silo", "note") else "right")
        for silo in silos:
            n = count(silo)
            if n < 1:
                table.add_row(silo.name, "0", "–", "–", "no training users: this silo will not train")
                continue
            info = local_schedule_note(n, local_batch_size(n), "auto")
            table.add_row(silo.name, str(n), str(info["batch"]), f"{info['sample_rate']:.3g}", info["note"])
        console.print(table)


@click.command()
@click.option("--model", "model_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Default: the latest model delivered to this node (SILO/.node/models/latest.pt).")
@click.option("--data", "--silo", "silo", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", default=Path("scores.csv"), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--consent-db", type=click.Path(path_type=Path), default=None, help="Default: SILO/.node/consent.db")
@click.option("--purpose", default="retention_modeling", show_default=True)
@click.option("--churn-threshold", default=0.6, show_default=True, type=click.FloatRange(0, 1))
@click.option("--top", default=10, show_default=True, type=click.IntRange(0),
              help="Rows of the win-back list to print.")
@click.option("--as-of", "as_of", default=None, type=click.DateTime(["%Y-%m-%d"]),
              help="Back-test: score with the data before this day (default: the end of the data).")
def score(model_path: Path | None, silo: Path, out_path: Path, consent_db: Path | None, purpose: str,
          churn_threshold: float, top: int, as_of: Any) -> None:
    """Score a merchant's own users with a global model: chance of leaving, value, win-back list.

    The list is ranked by expected value at risk (chance of not buying again within the model's
    horizon × the value the customer would bring if retained), in the shop's currency
    (merchant.json "currency") once calibrated on the shop's own last horizon.
    """
    import pandas as pd

    from fedretain.clients.node import MerchantNode, NodeConfig
    from fedretain.consent.gate import ConsentError
    from fedretain.ingest import write_table
    from fedretain.models import ModelBundle
    from fedretain.scoring import Segmenter, fit_money_calibration, merchant_currency, record_scoring_use, score_users

    try:
        node = MerchantNode(NodeConfig.for_silo(silo, consent_db=consent_db))
        if model_path is None:  # the model the platform delivered at the end of the last run (clients/delivery.py)
            from fedretain.clients.delivery import latest_model

            model_path = latest_model(node.config.state_dir)
            if not model_path.is_file():
                raise FileNotFoundError(f"no model was delivered to this node yet ({model_path}): join a run to "
                                        f"the end, or pass --model FILE")
        bundle = ModelBundle.load(model_path)
        currency = merchant_currency(node.silo.merchant)
        horizon = float(bundle.meta.get("horizon_days", 30.0))
        names = [c for c in bundle.feature_names if not c.startswith("has_")]
        cutoff = pd.Timestamp(as_of) if as_of else node.data_end()
        if cutoff > node.data_end():
            raise ValueError(f"--as-of {cutoff.date()} is after the end of this shop's data ({node.data_end().date()})")
        try:  # the shop's own factor from its labelled users of the last horizon (local, nothing leaves)
            prep = node.prepare(purpose, names, horizon, str(cutoff - pd.Timedelta(days=horizon)))
            calibration = fit_money_calibration(bundle, prep, horizon, currency)
            note = (f"values in {currency or 'the shop currency'} over the next {horizon:g} days, calibrated on "
                    f"{calibration.n_users} of this shop's customers, whose mean spend it matches")
        except ValueError as exc:
            calibration = None
            note = f"values NOT calibrated in money ({exc}); use them to rank, not to budget"
        decision, gated = node.gate(purpose)
        scores = score_users(bundle, gated, cutoff, Segmenter(churn_threshold=churn_threshold), calibration)
        run_id, rnd = str(bundle.meta.get("run_id", "")), int(bundle.meta.get("round", 0) or 0)
        with node.ledger() as ledger:  # scoring is a use of the users' data: recorded before any score is written
            if calibration is not None:
                record_scoring_use(ledger, prep.decision, prep.used_users, names, run_id, rnd, "score-calibration")
            record_scoring_use(ledger, decision, scores["user_id"], names, run_id, rnd, "score")
    except (ValueError, FileNotFoundError, ConsentError) as exc:
        raise click.ClickException(str(exc)) from exc
    write_table(scores, out_path)
    console.print(win_back_table(scores, top, f"Win-back list: top {min(top, len(scores))} of {len(scores)} scored "
                                              f"customers ({decision.n_excluded} without consent for {purpose} "
                                              f"not scored)", currency))
    console.print(note)
    console.print(segment_table(scores))
    console.print(f"scores written to {out_path} (full precision)")


def _money(v: float) -> str:
    return f"{v:,.2f}"


def win_back_table(scores: Any, top: int, title: str, currency: str = "") -> Table:
    """The top of the win-back list, with plain-word headings that fit 80 columns and are never cut."""
    unit = f"\n({currency})" if currency else ""
    table = Table(title=title)
    for col, justify in (("rank", "right"), ("customer", "left"), ("chance of\nleaving", "right"),
                         (f"value if\nretained{unit}", "right"), (f"value at\nrisk{unit}", "right"),
                         (f"past\nspend{unit}", "right"), ("segment", "left")):
        table.add_column(col, justify=justify, no_wrap=col not in ("customer", "segment"), overflow="fold",
                         min_width={"rank": 4, "segment": 10}.get(col))
    for row in scores.head(top).itertuples():
        table.add_row(str(row.rank), str(row.user_id), f"{row.churn_probability:.1%}", _money(row.value_if_retained),
                      _money(row.expected_value_at_risk), _money(row.past_spend), str(row.segment))
    return table


def segment_table(scores: Any) -> Table:
    """Customers per segment, as a table (not a pandas dump)."""
    table = Table(title="Customers per segment")
    table.add_column("segment")
    table.add_column("customers", justify="right")
    table.add_column("share", justify="right")
    counts = scores["segment"].value_counts()
    for seg, n in counts.items():
        table.add_row(str(seg), str(int(n)), f"{n / max(len(scores), 1):.0%}")
    return table
