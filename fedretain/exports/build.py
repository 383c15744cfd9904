"""Building one output table (events or users) from a shop's files: joins, aggregates, rules, groups.

Why a verdict per source row: the merchant must be able to account for every row of every file
(accepted + skipped by a named rule + quarantined = read). ``Ledger`` keeps one verdict per row of a
file, the first one given wins; rows of joined or aggregated files follow the row they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedretain.exports.expr import Expr, Result, evaluate
from fedretain.exports.ids import normalise_ids
from fedretain.exports.spec import MappingV2, Source, TableSpec
from fedretain.mapping import parse_timestamps

PENDING, ACCEPTED, SKIPPED, QUARANTINED = 0, 1, 2, 3
NUMERIC_FIELDS = ("amount", "watch_seconds")  # read as numbers here, so a bad value names the shop's column


class Ledger:
    """One verdict per row of a source file: pending, accepted, skipped (rule) or quarantined (reason)."""

    def __init__(self, source: Source, frame: pd.DataFrame, first_row: int):
        self.source = source
        self.frame = frame
        self.first_row = first_row
        n = len(frame)
        self.state = np.zeros(n, dtype=np.int8)
        self.why = np.full(n, "", dtype=object)
        self.field = np.full(n, "", dtype=object)
        self.value = np.full(n, "", dtype=object)
        if n and len(frame.columns):
            blank = np.ones(n, dtype=bool)
            for col in frame.columns:
                blank &= frame[col].astype("string").fillna("").str.strip().eq("").to_numpy(dtype=bool)
            self.decide(blank, SKIPPED, "blank_row")
        if source.skip_duplicate_rows and n:
            self.decide(frame.duplicated(keep="first").to_numpy(), SKIPPED, "duplicate_row")

    def decide(self, mask: np.ndarray, state: int, why: str | np.ndarray, fld: str = "",
               values: pd.Series | np.ndarray | None = None) -> np.ndarray:
        """Give ``state`` to the pending rows in ``mask``; return which rows it was given to."""
        hit = np.asarray(mask, dtype=bool) & (self.state == PENDING)
        if hit.any():
            self.state[hit] = state
            self.why[hit] = why[hit] if isinstance(why, np.ndarray) else why
            self.field[hit] = fld
            if values is not None:
                self.value[hit] = np.asarray(pd.Series(values).astype("string").fillna(""), dtype=object)[hit]
        return hit

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """File row numbers (as the merchant sees them) of frame positions."""
        return positions + self.first_row


@dataclass
class Built:
    """An output table before validation, and which source rows each output row came from."""

    frame: pd.DataFrame  # output fields + source_ref (output row number) + source_rows (text)
    main_out: np.ndarray  # per row of the main file: output row, or -1
    children: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (source, parent row per child row)
    unmapped: dict[str, dict[str, int]] = field(default_factory=dict)  # field -> unknown value -> rows
    rejected_values: list[tuple[int, str, str]] = field(default_factory=list)  # (main row pos, field, value)


def build_table(spec: MappingV2, t: TableSpec, ledgers: dict[str, Ledger]) -> Built:
    main = ledgers[t.source]
    raw = main.frame
    n = len(raw)
    index = pd.RangeIndex(n)
    local: dict[str, pd.Series] = {c: raw[c] for c in raw.columns}
    joined: dict[str, pd.DataFrame] = {}
    pending: list[tuple[np.ndarray, int, str, str, pd.Series | None]] = []  # (mask, state, why, field, values)

    def resolve(source: str | None, column: str) -> pd.Series:
        if source is not None:
            return joined[source][column]
        if column in local:
            return local[column]
        owners = [s for s, f in joined.items() if column in f.columns]
        return joined[owners[0]][column]

    def run(expr: Expr, as_number: bool = False) -> pd.Series:
        res: Result = evaluate(expr, resolve, index, spec.numbers, as_number=as_number)
        for col, bad in res.errors.items():
            pending.append((bad, QUARANTINED, "not a number", col, resolve_or_none(col)))
        return res.values

    def resolve_or_none(col: str) -> pd.Series | None:
        src, _, name = col.rpartition(".")
        try:
            return resolve(src or None, name)
        except (KeyError, IndexError):
            return None

    for j in t.joins:
        other = ledgers[j.source]
        left = normalise_ids(run(j.left), spec.ids)
        right = normalise_ids(other.frame[j.right], spec.ids)
        dup = right.duplicated(keep=False).to_numpy() & right.ne("").to_numpy()
        other.decide(dup, QUARANTINED, f"duplicate join key in {other.source.file}", j.right, other.frame[j.right])
        ok_right = right[~dup & right.ne("").to_numpy()]
        pos = pd.Index(ok_right.to_numpy()).get_indexer(left.to_numpy())
        hit_rows = np.full(n, -1, dtype=np.int64)
        hit_rows[pos >= 0] = ok_right.index.to_numpy()[pos[pos >= 0]]
        if len(other.frame):
            matched = other.frame.iloc[np.maximum(hit_rows, 0)].reset_index(drop=True)
            matched = matched.where(np.broadcast_to((hit_rows >= 0)[:, None], matched.shape), "")
        else:  # an empty lookup file: nothing matches
            matched = pd.DataFrame("", index=index, columns=other.frame.columns)
        joined[j.source] = matched
        ambiguous = left.isin(set(right[dup])).to_numpy()
        unmatched = hit_rows < 0
        pending.append((ambiguous, QUARANTINED, f"several rows of {other.source.file} have this {j.right}",
                        j.left.text, left))
        if j.unmatched != "keep":
            state = QUARANTINED if j.unmatched == "quarantine" else SKIPPED
            why = f"no row in {other.source.file} with this {j.right}" if state == QUARANTINED \
                else f"unmatched {j.source}"
            pending.append((unmatched & ~ambiguous, state, why, j.left.text, left))

    children: list[tuple[str, np.ndarray]] = []
    for a in t.aggregates:
        child = ledgers[a.source]
        keys = normalise_ids(run(a.left), spec.ids)
        dup_parent = keys.duplicated(keep="first").to_numpy() & keys.ne("").to_numpy()
        why_dup = f"duplicate {a.left.text} (aggregating {child.source.file} needs one row per key)"
        pending.append((dup_parent, QUARANTINED, why_dup, a.left.text, keys))
        ckeys = normalise_ids(child.frame[a.right], spec.ids)
        cidx = pd.RangeIndex(len(ckeys))
        parent = pd.Index(keys.where(~dup_parent & keys.ne("").to_numpy(), "\x00dup").to_numpy()).get_indexer(
            ckeys.to_numpy())
        state = QUARANTINED if a.unmatched == "quarantine" else SKIPPED
        why = f"no row in {main.source.file} with this {a.left.text}" if state == QUARANTINED \
            else f"unmatched {a.source}"
        child.decide(parent < 0, state, why, a.right, child.frame[a.right])
        values: dict[str, pd.Series] = {}
        bad_child = np.zeros(len(ckeys), dtype=bool)
        for name, e in {**a.sums, **a.firsts}.items():
            res = evaluate(e, _frame_resolver(child.frame), cidx, spec.numbers, as_number=name in a.sums)
            for col, bad in res.errors.items():
                child.decide(bad & (parent >= 0), QUARANTINED, "not a number", col, child.frame[col])
                bad_child |= bad
            if name in a.sums:  # an empty value in a summed column is not a zero: the sum would be wrong
                empty = res.values.isna().to_numpy() & ~bad_child
                child.decide(empty & (parent >= 0), QUARANTINED, f"missing value for {name}", e.text)
                bad_child |= empty
            values[name] = res.values
        bad_parent = np.zeros(n, dtype=bool)
        bad_parent[parent[bad_child & (parent >= 0)]] = True
        pending.append((bad_parent, QUARANTINED, f"a row of {child.source.file} for this key was rejected",
                        a.left.text, keys))
        live = (parent >= 0) & ~bad_child
        grp = pd.Series(parent[live])
        for name in a.sums:
            v = values[name].to_numpy(dtype="float64", na_value=np.nan)[live]
            local[name] = pd.Series(np.bincount(grp, weights=v, minlength=n)[:n], index=index)
        for name in a.firsts:
            first = pd.Series(values[name].to_numpy()[live]).groupby(grp.to_numpy()).first()
            local[name] = pd.Series(first.reindex(range(n)).fillna("").to_numpy(), index=index).astype("string")
        if a.count:
            local[a.count] = pd.Series(np.bincount(grp, minlength=n)[:n].astype("float64"), index=index)
        children.append((a.source, parent))

    for name, e in t.derive.items():
        local[name] = run(e)

    for name, e in t.skip.items():
        hit = evaluate(e, resolve, index, spec.numbers).values
        main.decide(hit.fillna(False).astype(bool).to_numpy() if hit.dtype != bool else hit.to_numpy(), SKIPPED, name)
    fields = {name: run(e, as_number=name in NUMERIC_FIELDS) for name, e in t.fields.items()}
    for mask, state, why, fld, shown in pending:
        main.decide(mask, state, why, fld, shown)
    for name in t.group_sum:  # a line without a value would silently lower the group's sum
        main.decide(fields[name].isna().to_numpy(), QUARANTINED, f"missing value for {name}", t.fields[name].text)

    out = pd.DataFrame(index=index)
    for name, values in fields.items():
        out[name] = values
    out["user_id"] = normalise_ids(out["user_id"], spec.ids)
    if "ts" in out:
        ts_text = out["ts"].astype("string").fillna("").str.strip()
        ts = parse_timestamps(ts_text, fmt=spec.timestamp_format, unit=spec.timestamp_unit)
        ts_col = t.fields["ts"].text
        main.decide(ts_text.eq("").to_numpy(), QUARANTINED, "missing timestamp", ts_col, ts_text)
        hint = f"expected format {spec.timestamp_format!r}" if spec.timestamp_format else "expected ISO 8601 or epoch"
        main.decide(ts.isna().to_numpy(), QUARANTINED, f"unparseable timestamp ({hint})", ts_col, ts_text)
        out["ts"] = ts
    built = Built(pd.DataFrame(), np.full(n, -1, dtype=np.int64), children)
    for name, vm in t.values.items():
        text = out[name].astype("string").fillna("").str.strip()
        mapped = text.map(vm.mapping)
        unknown = mapped.isna() & text.ne("") & ~text.isin(_targets(name))
        if unknown.any():
            built.unmapped[name] = {str(k): int(v) for k, v in text[unknown].value_counts().items()}
        result = mapped.where(mapped.notna(), text)
        if name == "event":
            out[name] = result  # an unmapped event label is rejected by validation, with its row
            continue
        if vm.unknown == "reject":
            live = unknown.to_numpy() & (main.state == PENDING)
            built.rejected_values += [(int(i), name, str(text.iloc[i])) for i in np.flatnonzero(live)]
        out[name] = result.where(~unknown, "")

    live = np.flatnonzero(main.state == PENDING)
    out = out.iloc[live].reset_index(drop=True)
    if t.group_by:
        keys = [normalise_ids(evaluate(e, resolve, index, spec.numbers).values.iloc[live]
                              .reset_index(drop=True).astype("string"), spec.ids) for e in t.group_by]
        keys += [out[c].astype("string") for c in ("user_id", "event") if c in out]
        gid = pd.DataFrame({f"k{i}": k for i, k in enumerate(keys)}).groupby(
            [f"k{i}" for i in range(len(keys))], sort=False, dropna=False).ngroup().to_numpy()
        agg = {c: ("sum" if c in t.group_sum else "min" if c == "ts" else "first") for c in out.columns}
        grouped = out.groupby(gid, sort=True).agg(agg).reset_index(drop=True)
    else:
        gid = np.arange(len(out))
        grouped = out
    if "amount" in grouped and "event" in grouped:
        amount = pd.to_numeric(grouped["amount"], errors="coerce")
        refund = grouped["event"].astype("string").eq("refund").fillna(False).to_numpy() & (amount < 0).to_numpy()
        grouped["amount"] = np.where(refund, -amount, amount)  # the mapping says these are refunds
    built.main_out[live] = gid
    grouped["source_ref"] = np.arange(len(grouped), dtype=np.int64)
    grouped["source_rows"] = _row_lists(main, live, gid, len(grouped))
    built.frame = grouped
    return built


def _frame_resolver(frame: pd.DataFrame):
    """Columns of one file (an aggregated file's expressions read only its own columns)."""
    def resolve(source: str | None, column: str) -> pd.Series:
        return frame[column]

    return resolve


def _targets(name: str) -> list[str]:
    from fedretain.exports.spec import VALUE_TARGETS

    return list(VALUE_TARGETS[name])


def _row_lists(main: Ledger, live: np.ndarray, gid: np.ndarray, n_out: int, limit: int = 5) -> list[str]:
    """'orders.csv rows 2, 5, 9' per output row (the first ``limit`` rows), for the merchant to trace it."""
    order = np.lexsort((live, gid))
    g = gid[order]
    rows = main.rows(live)[order].astype(str).astype(object)
    start = np.searchsorted(g, np.arange(n_out))
    nth = np.arange(len(g)) - start[g]
    size = np.bincount(g, minlength=n_out)
    out = np.where(size > 1, f"{main.source.file} rows ", f"{main.source.file} row ").astype(object)
    for k in range(limit):
        sel = nth == k
        out[g[sel]] = out[g[sel]] + ("" if k == 0 else ", ") + rows[sel]
    more = size > limit
    out[more] = out[more] + np.array([f" (+{m} more)" for m in size[more] - limit], dtype=object)
    return out.tolist()
