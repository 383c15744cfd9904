"""Erasure impact: what one data subject's withdrawal means for models already trained.

A compliance officer answering "what happened to my data" needs, per use of the
subject's data: which run and round, which model came out of it, what the subject
had consented to at that moment, what they consent to now, how strongly differential
privacy bounds the subject's influence on that model, and which models a retrain
without the subject would replace. The consent ledger's usage log says which uses
read the subject's data; the platform's run records (``run.json``) say which model
each round produced; the run's privacy settings say the DP bound. This module joins
them. It reads run records as plain JSON (the consent package does not import the
server) and takes DP bounds as data (the CLI reads them from the budget ledger).

Why every later round counts: a global model of round r is computed from the model
of round r-1, so a subject whose data fed round r influences every model of that run
from round r on (and any model fine-tuned from them). Evaluation and analytics uses
read the data but change no weights; scoring reads it to produce scores only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .records import format_ts, parse_ts
from .vocab import SCOPES

__all__ = ["DPBound", "ModelRef", "RunModels", "UseImpact", "SubjectImpact", "subject_impact", "read_run_record",
           "withdrawn_users_in_models", "phase_of", "parse_time"]

PHASES = ("train", "evaluate", "score", "analytics")


@dataclass(frozen=True)
class DPBound:
    """The (ε, δ) differential-privacy bound of one run on one node; ``epsilon=None``: no DP."""

    mode: str
    epsilon: float | None
    delta: float | None
    source: str = field(default="", compare=False)  # "privacy ledger (spent)", "run record (declared)", ...

    def describe(self) -> str:
        if self.epsilon is None:
            return f"none ({self.mode}): the model carries no formal bound on one person's influence"
        delta = "?" if self.delta is None else f"{self.delta:.1e}"
        return f"ε={self.epsilon:.3g}, δ={delta} ({self.mode} DP)"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "epsilon": self.epsilon, "delta": self.delta, "source": self.source}


@dataclass(frozen=True)
class ModelRef:
    """One global model a run produced: round, file and SHA-256 of the file (if known)."""

    run_id: str
    round: int
    sha256: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "round": self.round, "sha256": self.sha256, "path": self.path}


@dataclass(frozen=True)
class RunModels:
    """What a platform run record says about one run: its models and its DP setting."""

    run_id: str
    models: tuple[ModelRef, ...]
    privacy: DPBound | None = None


def _sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def read_run_record(path: str | Path) -> RunModels:
    """Models (round, checkpoint, hash) and DP setting of one ``run.json``.

    A round's ``model_sha256`` is used when the record has one; otherwise the checkpoint
    file named in the record is hashed if it is still there (relative paths are taken
    from the record's folder).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a readable run record ({exc})") from None
    run_id = str(data.get("run_id") or "")
    if not run_id:
        raise ValueError(f"{p}: run record has no run_id")
    models = []
    for r in data.get("rounds", []):
        ckpt = r.get("checkpoint")
        digest = r.get("model_sha256")
        if digest is None and ckpt:
            c = Path(ckpt)
            digest = _sha256(c if c.is_absolute() else p.parent / c) or _sha256(p.parent / "checkpoints" / c.name)
        models.append(ModelRef(run_id, int(r.get("round", 0)), digest, str(ckpt) if ckpt else None))
    cfg = data.get("config") or {}
    mode = str(cfg.get("dp_mode", cfg.get("dp-mode", "none")) or "none")
    privacy = None
    if mode != "none":
        eps = cfg.get("target_epsilon", cfg.get("target-epsilon"))
        delta = cfg.get("target_delta", cfg.get("target-delta"))
        privacy = DPBound(mode, float(eps) if eps is not None else None, float(delta) if delta else None,
                          source="run record (declared target)")
    else:
        privacy = DPBound("none", None, None, source="run record")
    return RunModels(run_id, tuple(sorted(models, key=lambda m: m.round)), privacy)


@dataclass(frozen=True)
class UseImpact:
    """One use of the subject's data and what it left behind."""

    usage_id: int
    run_id: str
    round: int
    phase: str
    purpose: str
    consent_at: str
    scopes_then: tuple[str, ...]
    consented_now: bool
    dp: DPBound | None
    produced: ModelRef | None  # the model this use fed directly (train rounds)
    replaced_by_retrain: tuple[ModelRef, ...]  # every model a retrain without the subject replaces

    def to_dict(self) -> dict[str, Any]:
        return {
            "usage_id": self.usage_id, "run_id": self.run_id, "round": self.round, "phase": self.phase,
            "purpose": self.purpose, "consent_at": self.consent_at, "scopes_then": list(self.scopes_then),
            "consented_now": self.consented_now,
            "dp": None if self.dp is None else self.dp.to_dict(),
            "produced": None if self.produced is None else self.produced.to_dict(),
            "replaced_by_retrain": [m.to_dict() for m in self.replaced_by_retrain],
        }


@dataclass(frozen=True)
class SubjectImpact:
    """All uses of one subject's data, with the consent state now."""

    subject: str
    at: str
    scopes_now: dict[str, tuple[str, ...]]  # purpose -> scopes granted now
    uses: tuple[UseImpact, ...] = field(default_factory=tuple)

    @property
    def models_to_replace(self) -> list[ModelRef]:
        """Distinct models a retrain without the subject would replace (runs in order of first use)."""
        seen: dict[tuple[str, int], ModelRef] = {}
        for use in self.uses:
            for m in use.replaced_by_retrain:
                seen.setdefault((m.run_id, m.round), m)
        return list(seen.values())

    @property
    def trained_after_withdrawal(self) -> list[UseImpact]:
        """Training uses whose purpose the subject no longer consents to (withdrawn or expired since)."""
        return [u for u in self.uses if u.phase == "train" and not u.consented_now]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject, "at": self.at,
            "scopes_now": {p: list(s) for p, s in self.scopes_now.items()},
            "uses": [u.to_dict() for u in self.uses],
            "models_to_replace": [m.to_dict() for m in self.models_to_replace],
        }


def phase_of(feature_set: str) -> str:
    """The kind of use a usage entry records (its ``feature_set`` prefix)."""
    head = feature_set.split(":", 1)[0]
    if head in ("train", "evaluate", "score"):
        return head
    if head.startswith("analytics"):
        return "analytics"
    return head or "unknown"


def _granted(state: Any, subject: str) -> tuple[str, ...]:
    if subject not in state.index:
        return ()
    row = state.loc[subject]
    return tuple(s for s in SCOPES if s in row.index and bool(row[s]))


def subject_impact(
    ledger: Any,
    subject: str,
    *,
    runs: Iterable[RunModels] = (),
    privacy: Mapping[str, DPBound] | None = None,
    now: datetime | None = None,
) -> SubjectImpact:
    """Every use of ``subject``'s data recorded in ``ledger``'s usage log, with its impact.

    ``runs`` are the platform's run records (models per round); ``privacy`` maps run id →
    the node's DP bound for that run (from its budget ledger), taking precedence over the
    run record's declared setting. The consent state at each use is replayed from the
    ledger at the time the node evaluated it.
    """
    at = now or datetime.now(timezone.utc)
    by_run = {r.run_id: r for r in runs}
    privacy = dict(privacy or {})
    uses = list(ledger.usages(subject))
    purposes = sorted({u.purpose for u in uses} | set(_subject_purposes(ledger, subject)))
    scopes_now = {p: _granted(ledger.state_at(p, at, [subject]), subject) for p in purposes}
    out = []
    for u in uses:
        phase = phase_of(u.feature_set)
        run = by_run.get(u.run_id)
        dp = privacy.get(u.run_id) or (run.privacy if run else None)
        produced = None
        replaced: tuple[ModelRef, ...] = ()
        if phase == "train":
            models = run.models if run else ()
            produced = next((m for m in models if m.round == u.round), ModelRef(u.run_id, u.round))
            later = tuple(m for m in models if m.round >= u.round)
            replaced = later or (produced,)
        then = _granted(ledger.state_at(u.purpose, u.at, [subject]), subject)
        out.append(UseImpact(
            usage_id=u.usage_id, run_id=u.run_id, round=u.round, phase=phase, purpose=u.purpose,
            consent_at=format_ts(u.at), scopes_then=then, consented_now=bool(scopes_now.get(u.purpose)),
            dp=dp, produced=produced, replaced_by_retrain=replaced,
        ))
    return SubjectImpact(subject, format_ts(at), scopes_now, tuple(out))


def _subject_purposes(ledger: Any, subject: str) -> list[str]:
    return sorted({r.purpose for r in ledger.iter_records(subject)})


def withdrawn_users_in_models(ledger: Any, *, runs: Iterable[RunModels] = (),
                              now: datetime | None = None) -> list[dict[str, Any]]:
    """The officer report's table: per training run, users it trained on who no longer consent.

    One row per (run, purpose): how many distinct subjects fed a training round and have
    since withdrawn (or expired) for that purpose, and the models a retrain would replace.
    """
    at = now or datetime.now(timezone.utc)
    by_run = {r.run_id: r for r in runs}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    conn = ledger.connection
    q = ("SELECT u.run_id, u.purpose, MIN(u.round), s.subject_id FROM usage u "
         "JOIN usage_subjects s ON s.usage_id = u.usage_id WHERE u.feature_set LIKE 'train:%' "
         "GROUP BY u.run_id, u.purpose, s.subject_id")
    first_round: dict[tuple[str, str], dict[str, int]] = {}
    for run_id, purpose, rnd, subj in conn.execute(q):
        first_round.setdefault((run_id, purpose), {})[subj] = int(rnd)
    for (run_id, purpose), subjects in first_round.items():
        state = ledger.state_at(purpose, at, list(subjects) if len(subjects) <= 500 else None)
        granted = state.reindex(list(subjects)).fillna(False).any(axis=1) if len(state) else None
        gone = [s for s in subjects if granted is None or not bool(granted.get(s, False))]
        if not gone:
            continue
        first = min(subjects[s] for s in gone)
        run = by_run.get(run_id)
        models = [m.to_dict() for m in (run.models if run else ()) if m.round >= first]
        rows[(run_id, purpose)] = {"run_id": run_id, "purpose": purpose, "withdrawn_users": len(gone),
                                   "users_trained_on": len(subjects), "from_round": first, "models": models}
    return list(rows.values())


def parse_time(value: Any) -> datetime:
    """Officer-supplied time (``--at``) in the ledger's format."""
    return parse_ts(value, "at")
