"""The mapping expression language: what it computes, what it refuses, and id normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedretain.exports.expr import ExprError, evaluate, parse
from fedretain.exports.ids import compare_ids, normalise_ids
from fedretain.exports.spec import IdRules

TABLE = pd.DataFrame({
    "InvoiceNo": ["536365", "C536379", "536380", "c536381", "536382"],
    "Quantity": ["6", "-1", "two", "", "3"],
    "UnitPrice": ["2.55", "27.50", "1.00", "4", "0.5"],
    "StockCode": ["85123A", "D", "POST", "22423", "bank charges"],
    "Unit Price": ["1", "2", "3", "4", "5"],
})
JOINED = {"orders": pd.DataFrame({"status": ["delivered", "canceled", "", "shipped", "delivered"]})}


def ev(text: str):
    def resolve(source, column):
        return (TABLE if source is None else JOINED[source])[column]

    return evaluate(parse(text), resolve, TABLE.index)


def test_arithmetic_reads_text_as_numbers_and_flags_the_rest():
    res = ev("Quantity * UnitPrice")
    np.testing.assert_allclose(res.values.to_numpy(), [15.3, -27.5, np.nan, np.nan, 1.5], equal_nan=True)
    assert list(res.errors) == ["Quantity"] and res.errors["Quantity"].tolist() == [False, False, True, False, False]


def test_conditionals_patterns_membership_and_joined_columns():
    kind = ev("'refund' if startswith(upper(InvoiceNo), 'C') or Quantity < 0 else 'purchase'").values
    assert kind.tolist() == ["purchase", "refund", "purchase", "refund", "purchase"]
    fees = ev("upper(StockCode) in ('POST', 'D', 'BANK CHARGES')").values
    assert fees.tolist() == [False, True, True, False, True]
    assert ev("matches(InvoiceNo, '[0-9]+')").values.tolist() == [True, False, True, False, True]
    assert ev("orders.status not in ('canceled',)").values.tolist() == [True, False, True, True, True]
    assert ev("is_empty(Quantity)").values.tolist() == [False, False, False, True, False]
    assert ev("`Unit Price` + 1").values.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert ev("abs(number(Quantity))").values.iloc[1] == 1.0
    assert ev("concat(InvoiceNo, '-', StockCode)").values.iloc[0] == "536365-85123A"
    assert ev("coalesce(Quantity, '1')").values.tolist() == ["6", "-1", "two", "1", "3"]


@pytest.mark.parametrize("text", [
    "__import__('os').system('id')", "open('/etc/passwd')", "Quantity.__class__", "(lambda: 1)()",
    "[x for x in Quantity]", "Quantity ** 99999999", "globals()", "eval('1')", "f'{Quantity}'", "Quantity[0]",
    "None", "True", "a.b.c", "x := 1",
])
def test_code_is_refused(text):
    with pytest.raises(ExprError):
        parse(text)


def test_columns_are_listed_for_validation():
    assert parse("orders.status == 'x' and Quantity > `Unit Price`").columns == (
        ("orders", "status"), (None, "Quantity"), (None, "Unit Price"))


@pytest.mark.parametrize("raw, rules, want", [
    ([" 12471.0", "12471", "12471.50", "A7"], IdRules(), ["12471", "12471", "12471.50", "A7"]),
    (["00042", "0", "000", "0A1"], IdRules(strip_leading_zeros=True), ["42", "0", "0", "0A1"]),
    (["Ab", " aB "], IdRules(case="lower"), ["ab", "ab"]),
    ([" x "], IdRules(trim=False, integer_floats=False), [" x "]),
])
def test_id_normalisation(raw, rules, want):
    assert normalise_ids(pd.Series(raw), rules).tolist() == want


def test_compare_ids_names_the_format_difference():
    o = compare_ids(pd.Series(["12471.0", "12472.0", "99"]), pd.Series(["12471", "12472", "99", "5"]))
    assert (o.n_both, o.users_without_consent, o.subjects_without_events) == (1, 2, 3)
    assert o.hint is not None and "float-printed" in o.hint and ("12471.0", "12471") in o.examples
    same = compare_ids(pd.Series(["a", "b"]), pd.Series(["a", "c"]))
    assert same.hint is None and same.n_both == 1
