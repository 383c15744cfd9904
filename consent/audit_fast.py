"""The verifier's fast pass: every record check of the exact pass, column-wise, for clean ledgers.

Sound, not explanatory: it returns the record count and root when everything checks, or
None, and then :func:`.audit._exact_records` (the pass to trust) finds and names the
problem. Kept apart so the exact pass stays short enough to review line by line.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .merkle import EMPTY_ROOT, Frontier
from .store import ZERO_HASH
from .timing import step

__all__ = ["fast_records"]

_MIN_US = 0  # 1970-01-01T00:00:00Z
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z

_FAST_ROWS = 1 << 15  # records per fetch in the fast pass
_TEXT_COLUMNS = ("record_id", "subject_id", "purpose", "action", "scopes")


def fast_records(conn: Any, controller: str, checkpoints: dict[int, list[tuple[str, str]]],
                  max_head: int) -> tuple[int, str] | None:
    """Every record check of :func:`.audit._exact_records`, column-wise; ``(n, root_hex)`` or None.

    None means "something is off" and :func:`.audit._exact_records` then finds and names it, so
    this pass only has to be *sound* (never accept what the exact pass rejects), not
    explanatory. How each exact check is covered:

    * seq contiguous from 1 and covered by a head: ``count``/``min``/``max`` of the
      INTEGER PRIMARY KEY (unique integers), all read in the same transaction;
    * chain: ``prev_hash`` equals the previous stored ``entry_hash`` (list equality in
      C) and ``entry_hash == SHA-256(previous entry || leaf)``, computed for all rows;
    * RFC 9162 roots at every signed or usage-pinned size, and no size beyond the log;
    * indexed columns: rather than parse each canonical text, re-encode the stored
      columns into the exact JSON fragments the canonical encoder writes around them
      (``{"action":"grant","collection_method":`` as a prefix; ``,"controller":...,
      "effective_at":"...","expires_at":...,"jurisdiction":``; ``,"purpose":...,"record_id":
      ...,"recorded_at":``; ``,"scopes":[...],"subject_id":...,"vocab_version":``) and test
      that the canonical text contains each. Once every leaf hashes to a signed root the
      texts are the node's own canonical JSON, in which a ``,"key":`` marker occurs only
      as that key and a JSON value's extent is fixed by its first byte, so containing the
      fragment means each stored value encodes exactly to the signed one. Columns of a
      different SQLite type, out-of-range times, or any fragment not found send the
      ledger to the exact pass.
    """
    try:
        return _fast_pass(conn, controller, checkpoints, max_head)
    except (TypeError, ValueError, OverflowError, pa.ArrowException, sqlite3.OperationalError):
        return None  # a value of an unexpected type or shape (or an older file): the exact pass explains it


def _fast_pass(conn: Any, controller: str, checkpoints: dict[int, list[tuple[str, str]]],
               max_head: int) -> tuple[int, str] | None:

    n, lo, hi = conn.execute("SELECT count(*), min(seq), max(seq) FROM records").fetchone()
    if n and (lo != 1 or hi != n):
        return None
    if n > max_head or any(size > n for size in checkpoints):
        return None
    sizes = sorted(s for s in checkpoints if s > 0)
    sha = hashlib.sha256
    frontier = Frontier()
    prev = ZERO_HASH
    done = 0
    ctrl_json = json.dumps(controller, ensure_ascii=False)
    cur = conn.execute("SELECT CAST(canonical AS BLOB), entry_hash, prev_hash, record_id, subject_id, purpose, "
                       "action, scopes, effective_at, expires_at, layout FROM records ORDER BY seq")
    while True:
        chunk = cur.fetchmany(_FAST_ROWS)
        if not chunk:
            break
        canon, entry, sprev, *cols = zip(*chunk)
        del chunk
        with step("verify: hash+chain"):
            leaves = [sha(b"\x00" + c).digest() for c in canon]
            if sprev[0] != prev or sprev[1:] != entry[:-1]:
                return None
            if [sha(p + h).digest() for p, h in zip(sprev, leaves)] != list(entry):
                return None
            prev = entry[-1]
        with step("verify: columns"):
            if not _columns_match(canon, cols, ctrl_json):
                return None
        with step("verify: merkle roots"):
            end = done + len(leaves)
            at = done
            for size in sizes:
                if done < size <= end:
                    frontier.extend(leaves[at - done : size - done])
                    at = size
                    root = frontier.root().hex()
                    if any(root != r for r, _ in checkpoints[size]):
                        return None
            frontier.extend(leaves[at - done :])
            done = end
    if done != n:
        return None  # the table changed under the read transaction: let the exact pass decide
    root = frontier.root().hex() if n else EMPTY_ROOT.hex()
    return n, root


class _Mismatch(Exception):
    """A column of an unexpected SQLite type or value range (the exact pass will say which)."""


def _columns_match(canon: Sequence[bytes], cols: Sequence[Sequence[Any]], ctrl_json: str) -> bool:
    """Do the stored indexed columns encode to the fragments at their places in each canonical text?

    All in Arrow/numpy, no Python call per record: the expected fragments are joined from
    the columns, and compared (``memcmp``) with string views into the concatenated
    canonical texts at the offsets the ``layout`` column gives (0 for the first fragment).
    """
    from .records import LAYOUT_KEYS, format_us, json_inner, unpack_layout

    rid, subj, purpose, action, scopes, eff, exp, layout = cols
    try:
        texts = {name: _text_column(col) for name, col in
                 (("record_id", rid), ("subject_id", subj), ("purpose", purpose), ("action", action),
                  ("scopes", scopes))}
        eff_a = _time_column(eff, nulls=False)
        exp_a = _time_column(exp, nulls=True)
        lay = _int_column(layout, nulls=False).to_numpy()
    except _Mismatch:
        return False
    if (lay < 0).any():
        return False
    lit = partial(pa.scalar, type=pa.string())

    def joined(*parts: Any) -> pa.Array:
        return pc.binary_join_element_wise(*parts, lit(""))

    if exp_a.null_count == len(exp_a):
        exp_json: Any = lit("null")
    else:
        present = pc.is_valid(exp_a)
        exp_json = pc.replace_with_mask(pa.repeat(lit("null"), len(exp_a)), present,
                                        format_us(exp_a.drop_null().to_numpy(), quoted=True).cast(pa.string()))
    s_enc = pc.dictionary_encode(texts["scopes"])
    s_json = pa.array([json.dumps(u.split(";") if u else [], ensure_ascii=False, separators=(",", ":"))
                       for u in s_enc.dictionary.to_pylist()], type=pa.string()).take(s_enc.indices)
    expected = [
        joined(lit('{"action":"'), json_inner(texts["action"]), lit('","collection_method":')),
        joined(lit(f',"controller":{ctrl_json},"effective_at":"'), format_us(eff_a.to_numpy()).cast(pa.string()),
               lit('","expires_at":'), exp_json, lit(',"jurisdiction":')),
        joined(lit(',"purpose":"'), json_inner(texts["purpose"]), lit('","record_id":"'),
               json_inner(texts["record_id"]), lit('","recorded_at":')),
        joined(lit(',"scopes":'), s_json, lit(',"subject_id":"'), json_inner(texts["subject_id"]),
               lit('","vocab_version":')),
    ]
    assert LAYOUT_KEYS == ("controller", "purpose", "scopes")
    offsets: list[int | np.ndarray] = [0, *unpack_layout(lay)]
    data = b"".join(canon)
    if len(data) >= 1 << 31:
        return False
    lens = np.fromiter(map(len, canon), dtype=np.int64, count=len(canon))
    ends = np.cumsum(lens)
    starts = ends - lens
    for frag, off in zip(expected, offsets):
        flen = pc.binary_length(frag).to_numpy().astype(np.int64)
        at = starts + off
        if (flen <= 12).any() or (at + flen > ends).any():
            return False
        view = _string_views(data, at, flen)
        if not pc.all(pc.equal(view, frag.cast(pa.string_view()))).as_py():
            return False
    return True


def _text_column(values: Sequence[Any]) -> pa.Array:
    arr = pa.array(values)  # str values give a string array; anything else another type (or an error)
    if not pa.types.is_string(arr.type) or arr.null_count:
        raise _Mismatch
    return arr


def _int_column(values: Sequence[Any], *, nulls: bool) -> pa.Array:
    arr = pa.array(values)
    if pa.types.is_null(arr.type) and nulls:
        return pa.nulls(len(arr), type=pa.int64())
    if arr.type != pa.int64() or (arr.null_count and not nulls):
        raise _Mismatch
    return arr


def _time_column(values: Sequence[Any], *, nulls: bool) -> pa.Array:
    """µs timestamps: int64 within 1970..9999 (other values cannot be in a canonical text)."""
    arr = _int_column(values, nulls=nulls)
    lo, hi = (v.as_py() for v in pc.min_max(arr).values())
    if lo is not None and not (_MIN_US <= lo and hi <= _MAX_US):
        raise _Mismatch
    return arr


def _string_views(data: bytes, at: np.ndarray, length: np.ndarray) -> pa.Array:
    """A ``string_view`` array of ``data[at[i] : at[i] + length[i]]`` (all lengths > 12): no copy.

    Each view is 16 bytes: int32 length, the first 4 bytes, int32 buffer index, int32 offset.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    views = np.zeros((len(at), 4), dtype=np.int32)
    views[:, 0] = length
    views[:, 1] = raw[at[:, None] + np.arange(4)].view("<i4").reshape(-1)
    views[:, 3] = at
    return pa.Array.from_buffers(pa.string_view(), len(at), [None, pa.py_buffer(views), pa.py_buffer(data)])
