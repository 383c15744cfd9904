"""A small, safe expression language for mapping v2 (derived fields, row filters, output fields).

Why not Python ``eval``: a mapping file comes from a merchant and must never run code. An
expression is parsed with :mod:`ast` and only the node types listed here are accepted; it is then
evaluated *vectorised* over a whole table (pandas), so a 500k-line export costs a few column ops.

Syntax (Python-like)::

    Quantity * UnitPrice                       arithmetic: + - * /, unary -
    Quantity < 0 or startswith(InvoiceNo, 'C') comparisons, and / or / not
    StockCode in ('POST', 'M', 'BANK CHARGES') membership in a list of constants
    'refund' if Quantity < 0 else 'purchase'   conditional
    orders.status                              a column of a joined source
    `Unit Price`                               a column whose name is not an identifier

Functions: ``startswith endswith contains matches`` (regex, full match) ``lower upper strip``
``abs number text is_empty coalesce concat``.

Values are text (every file column is read as text) or numbers; text is converted to a number
where arithmetic or a numeric comparison needs it. Text that is not a number there is an error
for that row only (``Result.errors`` names the column), never for the whole file. Empty text is a
missing value (NaN in arithmetic, and comparisons with it are false).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedretain.mapping import parse_numbers

FUNCTIONS: tuple[str, ...] = (
    "startswith", "endswith", "contains", "matches", "lower", "upper", "strip", "abs", "number", "text",
    "is_empty", "coalesce", "concat",
)
_ARITH: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                ast.Div: operator.truediv}
_CMP: dict[type, Callable] = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
                              ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_BACKTICK = re.compile(r"`([^`]*)`")


class ExprError(ValueError):
    """An expression that cannot be parsed or names something unknown (a mapping error)."""


@dataclass(frozen=True)
class Expr:
    """A parsed expression and the columns it reads (``(source or None, column)`` pairs)."""

    text: str
    tree: ast.expr
    columns: tuple[tuple[str | None, str], ...]


def parse(text: str) -> Expr:
    """Parse and check an expression; raise ``ExprError`` saying what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExprError(f"expected an expression (a non-empty string), got {text!r}")
    src = _BACKTICK.sub(lambda m: f"col({m.group(1)!r})", text.strip())
    try:
        tree = ast.parse(src, mode="eval").body
    except SyntaxError as exc:
        raise ExprError(f"cannot parse {text!r}: {exc.msg}") from None
    cols: list[tuple[str | None, str]] = []
    _check(tree, text, cols)
    return Expr(text, tree, tuple(dict.fromkeys(cols)))


def _check(node: ast.AST, text: str, cols: list) -> None:
    for name in (getattr(node, "id", None), getattr(node, "attr", None)):
        if isinstance(name, str) and name.startswith("__"):  # never meaningful as a column; refuse outright
            raise ExprError(f"in {text!r}: name {name!r} is not allowed")
    if isinstance(node, ast.Name):
        cols.append((None, node.id))
        return
    if isinstance(node, ast.Attribute):
        if not isinstance(node.value, ast.Name):
            raise ExprError(f"in {text!r}: only source.column is allowed after a dot")
        cols.append((node.value.id, node.attr))
        return
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ExprError(f"in {text!r}: unknown function")
        name = node.func.id
        if name == "col":
            arg = node.args[0] if len(node.args) == 1 else None
            if not isinstance(arg, ast.Constant) or not isinstance(arg.value, str):
                raise ExprError(f"in {text!r}: col() takes one column name")
            cols.append((None, arg.value))
            return
        if name not in FUNCTIONS:
            raise ExprError(f"in {text!r}: unknown function {name!r}; allowed: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise ExprError(f"in {text!r}: {name}() takes no keyword arguments")
        for arg in node.args:
            _check(arg, text, cols)
        return
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (str, int, float)) or isinstance(node.value, bool):
            raise ExprError(f"in {text!r}: constant {node.value!r} is not a string or number")
        return
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
        if not isinstance(node.comparators[0], (ast.Tuple, ast.List)) or not all(
                isinstance(e, ast.Constant) for e in node.comparators[0].elts):
            raise ExprError(f"in {text!r}: 'in' needs a list of constants, like ('a', 'b')")
        _check(node.left, text, cols)
        return
    allowed = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.And, ast.Or, ast.Not, ast.USub,
               ast.UAdd, *_ARITH, *_CMP)
    if not isinstance(node, allowed):
        raise ExprError(f"in {text!r}: {type(node).__name__} is not allowed in a mapping expression")
    if isinstance(node, ast.BinOp) and type(node.op) not in _ARITH:
        raise ExprError(f"in {text!r}: operator {type(node.op).__name__} is not allowed (use + - * /)")
    for child in ast.iter_child_nodes(node):
        _check(child, text, cols)


@dataclass
class Result:
    """Evaluated values plus, per column, the rows where a value was not a number but had to be one."""

    values: pd.Series
    errors: dict[str, np.ndarray] = field(default_factory=dict)


Resolver = Callable[[str | None, str], pd.Series]


@dataclass(frozen=True)
class NumberFormat:
    """How the shop writes numbers: ``decimal`` '.' or ',', optional ``thousands`` separator ('1.234,56')."""

    decimal: str = "."
    thousands: str = ""

    def normalise(self, text: pd.Series) -> pd.Series:
        """Plain decimal notation; a value using the thousands separator out of place becomes invalid."""
        if self.thousands:
            grouped = (rf"^[+-]?\d{{1,3}}({re.escape(self.thousands)}\d{{3}})+"
                       rf"({re.escape(self.decimal)}\d*)?([eE][+-]?\d+)?$")
            has = text.str.contains(self.thousands, regex=False).fillna(False).astype(bool)
            ok = text.str.fullmatch(grouped).fillna(False).astype(bool)
            text = text.where(~has | ok, "\x00").str.replace(self.thousands, "", regex=False)
        if self.decimal != ".":
            text = text.where(~text.str.contains(".", regex=False).fillna(False).astype(bool), "\x00")
            text = text.str.replace(self.decimal, ".", regex=False)
        return text


def evaluate(expr: Expr, resolve: Resolver, index: pd.Index, numbers: NumberFormat | None = None, *,
             as_number: bool = False) -> Result:
    """Evaluate over a table; ``resolve(source, column)`` returns a column as text.

    ``as_number`` converts the result to numbers (recording the rows where it is not one), for
    fields and sums that must be numbers.
    """
    ev = _Eval(resolve, index, numbers or NumberFormat())
    try:
        out = ev.run(expr.tree)
        if as_number:
            out = ev.series(ev.num(out))
    except ExprError as exc:
        raise ExprError(f"in {expr.text!r}: {exc}") from None
    except ZeroDivisionError:
        raise ExprError(f"in {expr.text!r}: division by a constant zero") from None
    if not isinstance(out, pd.Series):
        out = pd.Series([out] * len(index), index=index)
    return Result(out, ev.errors)


class _Eval:
    def __init__(self, resolve: Resolver, index: pd.Index, numbers: NumberFormat):
        self.resolve = resolve
        self.index = index
        self.numbers = numbers
        self.errors: dict[str, np.ndarray] = {}
        self._origin: dict[int, str] = {}  # id(series) -> column it came from, for error messages

    def run(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self._col(None, node.id)
        if isinstance(node, ast.Attribute):
            return self._col(node.value.id, node.attr)  # type: ignore[attr-defined]
        if isinstance(node, ast.BinOp):
            return _ARITH[type(node.op)](self.num(self.run(node.left)), self.num(self.run(node.right)))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return ~self.boolean(self.run(node.operand))
            value = self.num(self.run(node.operand))
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BoolOp):
            parts = [self.boolean(self.run(v)) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.IfExp):
            cond = self.boolean(self.run(node.test))
            a, b = self.series(self.run(node.body)), self.series(self.run(node.orelse))
            if _is_num(a) != _is_num(b):
                a, b = self.num(a), self.num(b)
            return a.where(cond, b)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise ExprError(f"{type(node).__name__} is not allowed")  # unreachable after _check

    def _col(self, source: str | None, name: str) -> pd.Series:
        s = self.resolve(source, name)
        self._origin[id(s)] = name if source is None else f"{source}.{name}"
        return s

    def series(self, v) -> pd.Series:
        if isinstance(v, pd.Series):
            return v
        return pd.Series([v] * len(self.index), index=self.index,
                         dtype="float64" if isinstance(v, (int, float)) else "string")

    def num(self, v):
        """Numbers from text: '' is NaN; other non-numbers are NaN and recorded as errors."""
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            values, ok = parse_numbers(pd.Series([v.strip()]))
            if not ok[0] and v.strip():
                raise ExprError(f"{v!r} is not a number")
            return float(values[0])
        if _is_num(v):
            return v.astype("float64")
        text = v.astype("string").fillna("").str.strip()
        values, ok = parse_numbers(self.numbers.normalise(text) if self.numbers != NumberFormat() else text)
        bad = ~ok & text.ne("").to_numpy(dtype=bool)
        name = self._origin.get(id(v))
        if bad.any() and name is not None:
            self.errors[name] = self.errors.get(name, np.zeros(len(bad), dtype=bool)) | bad
        return pd.Series(values, index=v.index)

    def boolean(self, v) -> pd.Series:
        s = self.series(v)
        if s.dtype == bool:
            return s
        if _is_num(s):
            return s.fillna(0).ne(0)
        return s.fillna("").str.strip().ne("").astype(bool)

    def compare(self, node: ast.Compare) -> pd.Series:
        left = self.run(node.left)
        op = node.ops[0]
        if isinstance(op, (ast.In, ast.NotIn)):
            consts = [e.value for e in node.comparators[0].elts]  # type: ignore[attr-defined]
            numeric = all(isinstance(c, (int, float)) for c in consts)
            s = self.num(left) if numeric else _text(self.series(left))
            out = self.series(s).isin([float(c) for c in consts] if numeric else [str(c) for c in consts])
            out = out.fillna(False).astype(bool)
            return ~out if isinstance(op, ast.NotIn) else out
        if len(node.ops) != 1:
            raise ExprError("chained comparisons (a < b < c) are not allowed; use 'and'")
        right = self.run(node.comparators[0])
        numeric = any(isinstance(x, (int, float)) or (isinstance(x, pd.Series) and _is_num(x)) for x in (left, right))
        if numeric:
            a, b = self.series(self.num(left)), self.num(right)
        else:
            a, b = _text(self.series(left)), (_text(right) if isinstance(right, pd.Series) else str(right))
        out = _CMP[type(op)](a, b)
        return pd.Series(out, index=self.index).fillna(False).astype(bool)

    def call(self, node: ast.Call):
        name = node.func.id  # type: ignore[attr-defined]
        if name == "col":
            return self._col(None, node.args[0].value)  # type: ignore[attr-defined]
        args = [self.run(a) for a in node.args]
        need = {"startswith": 2, "endswith": 2, "contains": 2, "matches": 2, "lower": 1, "upper": 1, "strip": 1,
                "abs": 1, "number": 1, "text": 1, "is_empty": 1}
        if name in need and len(args) != need[name]:
            raise ExprError(f"{name}() takes {need[name]} argument(s), got {len(args)}")
        if name in ("coalesce", "concat") and not args:
            raise ExprError(f"{name}() needs at least one argument")
        if name in ("startswith", "endswith", "contains", "matches"):
            if not isinstance(args[1], str):
                raise ExprError(f"{name}(): the second argument must be a string constant")
            s = _text(self.series(args[0]))
            if name == "matches":
                try:
                    re.compile(args[1])
                except re.error as exc:
                    raise ExprError(f"matches(): bad regular expression {args[1]!r}: {exc}") from None
                out = s.str.fullmatch(args[1])
            elif name == "contains":
                out = s.str.contains(args[1], regex=False)
            else:
                out = getattr(s.str, name)(args[1])
            return out.fillna(False).astype(bool)
        if name in ("lower", "upper", "strip"):
            return getattr(_text(self.series(args[0])).str, name)()
        if name == "abs":
            return self.series(self.num(args[0])).abs()
        if name == "number":
            return self.series(self.num(args[0]))
        if name == "text":
            s = self.series(args[0])
            return _text(s) if not _is_num(s) else s.map(lambda x: "" if pd.isna(x) else f"{x:g}").astype("string")
        if name == "is_empty":
            s = self.series(args[0])
            return s.isna() if _is_num(s) else _text(s).eq("").astype(bool)
        parts = [self.series(a) for a in args]
        if name == "coalesce":
            out = parts[0]
            for p in parts[1:]:
                empty = out.isna() if _is_num(out) else _text(out).eq("")
                out = out.where(~empty, p)
            return out
        out = _text(parts[0]) if not _is_num(parts[0]) else parts[0].astype("string")
        for p in parts[1:]:
            out = out + (_text(p) if not _is_num(p) else p.astype("string").fillna(""))
        return out


def _is_num(s) -> bool:
    return isinstance(s, pd.Series) and pd.api.types.is_numeric_dtype(s.dtype) and s.dtype != bool


def _text(s: pd.Series) -> pd.Series:
    return s.astype("string").fillna("").str.strip()


def check_columns(expr: Expr, known: Mapping[str | None, set[str]], sources: set[str]) -> str | None:
    """The first column ``expr`` reads that is not known, as a message; None when all are."""
    for source, column in expr.columns:
        if source is not None and source not in sources:
            return f"unknown source {source!r} in {expr.text!r} (sources: {', '.join(sorted(sources))})"
        pool = known.get(source, set())
        if column not in pool:
            where = "" if source is None else f" of {source!r}"
            return f"unknown column {column!r}{where} in {expr.text!r}"
    return None
