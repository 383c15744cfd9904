"""Id formats: normalising ids the way a mapping says, and spotting ids that differ only in format.

Why: the same customer is ``12471.0`` in a spreadsheet export, ``12471`` in the CRM's consent
file, `` 12471`` after a copy-paste, ``C12471`` vs ``c12471`` in another system. Compared as they
are, every customer looks unconsented and is silently dropped by the consent gate. The mapping
declares the normalisation; ``data check`` uses ``format_hint`` to say when the two files would
match after one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fedretain.exports.spec import IdRules

_FLOAT_INT = r"^([+-]?\d+)\.0*$"


def normalise_ids(values: pd.Series, rules: IdRules) -> pd.Series:
    """Apply the id rules to text ids (missing values become '')."""
    s = values.astype("string").fillna("")
    if rules.trim:
        s = s.str.strip()
    if rules.integer_floats:
        s = s.str.replace(_FLOAT_INT, r"\1", regex=True)
    if rules.strip_leading_zeros:
        stripped = s.str.lstrip("0")
        s = s.where(~s.str.fullmatch(r"\d+").fillna(False).astype(bool), stripped.where(stripped.ne(""), "0"))
    if rules.case == "lower":
        s = s.str.lower()
    elif rules.case == "upper":
        s = s.str.upper()
    return s


# The candidate normalisations tried by ``format_hint``, in the order they are suggested.
_CANDIDATES: tuple[tuple[str, IdRules, str], ...] = (
    ("whitespace", IdRules(trim=True, integer_floats=False), '"ids": {"trim": true}'),
    ("float-printed ids (12471.0 vs 12471)", IdRules(trim=True, integer_floats=True),
     '"ids": {"integer_floats": true}'),
    ("letter case", IdRules(trim=True, integer_floats=True, case="lower"), '"ids": {"case": "lower"} (or "upper")'),
    ("zero padding (00042 vs 42)", IdRules(trim=True, integer_floats=True, case="lower", strip_leading_zeros=True),
     '"ids": {"strip_leading_zeros": true}'),
)


@dataclass(frozen=True)
class Overlap:
    """How the user ids of the events and the subject ids of the consent file compare."""

    n_users: int
    n_subjects: int
    n_both: int
    users_without_consent: int
    subjects_without_events: int
    hint: str | None  # set when many more ids would match after a format normalisation
    examples: tuple[tuple[str, str], ...] = ()  # (id in events, id in consent) pairs that differ only in format

    def to_dict(self) -> dict:
        return {"users": self.n_users, "consent_subjects": self.n_subjects, "in_both": self.n_both,
                "users_without_consent": self.users_without_consent,
                "subjects_without_events": self.subjects_without_events, "hint": self.hint,
                "examples": [list(e) for e in self.examples]}


def compare_ids(users: pd.Series, subjects: pd.Series) -> Overlap:
    """Overlap of two id columns as they are, plus a hint naming the format difference if one explains misses."""
    u = pd.Index(users.astype("string").dropna().unique())
    s = pd.Index(subjects.astype("string").dropna().unique())
    both = u.intersection(s)
    hint: str | None = None
    examples: tuple[tuple[str, str], ...] = ()
    missing = len(u) - len(both)
    if missing:
        for label, rules, setting in _CANDIDATES:
            nu = pd.Series(normalise_ids(pd.Series(u, dtype="string"), rules).to_numpy(), index=u)
            ns = pd.Series(normalise_ids(pd.Series(s, dtype="string"), rules).to_numpy(), index=s)
            gained = pd.Index(nu.unique()).intersection(pd.Index(ns.unique()))
            if len(gained) - len(both) >= max(1, missing // 10):
                pairs: list[tuple[str, str]] = []
                by_norm = pd.Series(ns.index, index=ns.to_numpy())
                for raw, norm in nu.items():
                    if raw in both or norm not in by_norm.index:
                        continue
                    other = by_norm.loc[norm]
                    other = other.iloc[0] if isinstance(other, pd.Series) else other
                    if other != raw:
                        pairs.append((str(raw), str(other)))
                    if len(pairs) == 3:
                        break
                examples = tuple(pairs)
                shown = ", ".join(f"{a!r} vs {b!r}" for a, b in examples)
                hint = (f"ids look differently formatted ({label}): {len(gained):,} of {len(u):,} users would match "
                        f"the consent file after normalising, {len(both):,} match as they are"
                        + (f" (e.g. {shown})" if shown else "")
                        + f"; set {setting} in a version 2 mapping.json, or fix the ids in one of the files")
                break
    return Overlap(len(u), len(s), len(both), missing, len(s) - len(both), hint, examples)
