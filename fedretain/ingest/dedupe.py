"""Exact-duplicate detection over a stream of batches: hash-based and linear in the rows seen.

Each row gets a 128-bit key (two independent 64-bit row hashes from polars; a false match between
two different rows has odds ~n²/2¹²⁹). The exact verdict is taken once, at the end, by one hash
group-by over every key (linear). While streaming, a flag per slot of the first hash (a Bloom filter
with one hash function, one bit per slot, 8-64 slots per row seen, grown by rebuilding from the
stored keys, so amortised linear) says which rows *may* repeat an earlier row; only those rows' raw values are
held (a few percent), so a duplicate can still be quarantined with the values it had in the file,
without holding the whole raw file in memory.
"""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["DuplicateFinder", "row_keys"]

_SEEDS = (0x9E3779B97F4A7C15, 0x27D4EB2F165667B1)
_MIN_SLOTS_PER_ROW = 8  # false "maybe" rate stays under 1/8
_GROWTH = 4


def row_keys(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes per row, equal for rows with equal values (column by column)."""
    h1 = frame.hash_rows(seed=_SEEDS[0]).to_numpy()
    h2 = frame.hash_rows(seed=_SEEDS[1]).to_numpy()
    return h1, h2


class DuplicateFinder:
    """Feed it the keys of every row that passed validation, in file order; ask at the end which repeat."""

    def __init__(self, est_rows: int = 0) -> None:
        self._n = 0
        self._keys: list[pl.DataFrame] = []
        self._flags = np.zeros(0, dtype=np.uint8)
        self._slot_mask = np.uint64(0)
        self._grow(max(est_rows, 1 << 10))
        self._held: list[tuple[pl.DataFrame, np.ndarray]] = []  # raw values of rows that may repeat
        self._held_h1: list[np.ndarray] = []

    def add(self, h1: np.ndarray, h2: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Remember these rows' keys; return which of them may repeat an earlier row (a superset)."""
        if (self._n + len(h1)) * _MIN_SLOTS_PER_ROW > len(self._flags) * 8:
            self._grow(self._n + len(h1))
        slot = h1 & self._slot_mask
        byte, bit = (slot >> np.uint64(3)).astype(np.int64), (slot & np.uint64(7)).astype(np.uint8)
        seen = ((self._flags[byte] >> bit) & 1).astype(bool)
        within = ~pl.Series(h1).is_first_distinct().to_numpy()
        self._set(byte, bit)
        self._n += len(h1)
        self._keys.append(pl.DataFrame({"h1": h1, "h2": h2, "row": rows}))
        return seen | within

    def _grow(self, rows: int) -> None:
        """A bigger flag table (a power of two, >= 8 slots per row), refilled from the stored keys."""
        size = 1 << max(6, int(np.ceil(np.log2(max(rows, 1) * _MIN_SLOTS_PER_ROW * _GROWTH))))
        self._flags = np.zeros(size // 8, dtype=np.uint8)  # one bit per slot
        self._slot_mask = np.uint64(size - 1)
        for part in self._keys:
            slot = part.get_column("h1").to_numpy() & self._slot_mask
            self._set((slot >> np.uint64(3)).astype(np.int64), (slot & np.uint64(7)).astype(np.uint8))

    def _set(self, byte: np.ndarray, bit: np.ndarray) -> None:
        """Set bits, one bit position at a time: repeated bytes then all write the same value."""
        for b in range(8):
            at = byte[bit == b]
            self._flags[at] = self._flags[at] | np.uint8(1 << b)

    def hold(self, raw: pl.DataFrame, rows: np.ndarray, h1: np.ndarray) -> None:
        """Keep the raw values (and first hash) of rows that may turn out to be duplicates."""
        if raw.height:
            self._held.append((raw, rows))
            self._held_h1.append(h1)

    def finish(self) -> pl.DataFrame:
        """Duplicates as columns ``row`` (the copy) and ``first_row`` (the row it repeats), by row."""
        empty = pl.DataFrame({"row": [], "first_row": []}, schema={"row": pl.Int64, "first_row": pl.Int64})
        if not self._keys:
            return empty
        if not self._held:
            return empty
        flagged = pl.concat([pl.Series("h1", h1) for h1 in self._held_h1]).unique()
        keys = pl.concat(self._keys, rechunk=False)
        self._keys = []
        # every repeat was flagged while streaming: only keys sharing a flagged first hash can be involved
        maybe = keys.filter(pl.col("h1").is_in(flagged.implode()))
        if not maybe.height:
            return empty
        return (maybe.with_columns(pl.col("row").min().over("h1", "h2").alias("first_row"))
                .filter(pl.col("row") != pl.col("first_row"))
                .select("row", "first_row").sort("row"))

    def held_rows(self, rows: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
        """The held raw values of ``rows`` (which must all have been reported as possible repeats)."""
        want = pl.Series(rows)
        parts, nums = [], []
        for raw, held in self._held:
            hit = pl.Series(held).is_in(want.implode()).to_numpy()
            if hit.any():
                parts.append(raw.filter(pl.Series(hit)))
                nums.append(held[hit])
        if not parts:
            raise AssertionError("a duplicate row was not held")  # the filter is a superset by construction
        return pl.concat(parts, how="vertical_relaxed"), np.concatenate(nums)
