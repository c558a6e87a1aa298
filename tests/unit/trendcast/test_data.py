"""Loading, cleaning and bucketing of sales files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trendcast.data import ColumnMap, bucketize, clean_lines, load_sales, sample_data_path
from trendcast.exceptions import DataError
from trendcast.freq import parse_freq

RETAIL = ColumnMap(item="StockCode", time="InvoiceDate", quantity="Quantity", price="UnitPrice")


def retail_lines() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "InvoiceNo": ["1", "1", "C2", "3", "4", "5"],
            "StockCode": ["85048", "POST", "85048", "85048", "22041", "85048"],
            "InvoiceDate": [
                "2011-01-03 10:00",
                "2011-01-03 10:00",
                "2011-01-03 11:00",
                "2011-01-05 09:00",
                "2011-01-04 12:00",
                "2011-01-05 18:00",
            ],
            "Quantity": [6, 1, -2, 3, 10, 1],
            "UnitPrice": [2.0, 18.0, 2.0, 1.0, 0.5, 3.0],
        }
    )


def test_bucketize_dense_daily_with_price_and_pattern() -> None:
    lines, has_price = clean_lines(retail_lines(), columns=RETAIL, item_pattern=r"^\d{5}$")
    panel = bucketize(lines, parse_freq("1D"), has_price=has_price)
    frame = panel.frame
    assert set(frame["item_id"]) == {"85048", "22041"}
    a = frame[frame["item_id"] == "85048"]
    assert a["ts"].dt.day.tolist() == [3, 4, 5]
    assert a["quantity"].tolist() == [6.0, 0.0, 4.0]  # return dropped, day 4 closed -> 0
    # Quantity-weighted price on day 5 (3 @ 1.0 + 1 @ 3.0), carried forward over day 4.
    assert a["price"].tolist() == pytest.approx([2.0, 2.0, 1.5])
    b = frame[frame["item_id"] == "22041"]
    assert b["ts"].dt.day.tolist() == [4, 5]  # from first sale to the data's end
    assert panel.end == pd.Timestamp("2011-01-05")


def test_returns_net_offsets_sales_never_below_zero() -> None:
    lines, has_price = clean_lines(retail_lines(), columns=RETAIL, returns="net")
    panel = bucketize(lines, parse_freq("1D"), has_price=has_price)
    a = panel.frame[panel.frame["item_id"] == "85048"]
    assert a["quantity"].tolist() == [4.0, 0.0, 4.0]
    only_return = pd.DataFrame(
        {"item_id": ["x"], "ts": ["2011-01-01T00:00:00Z"], "quantity": [-5.0]}
    )
    lines, _ = clean_lines(only_return, returns="net")
    assert bucketize(lines, parse_freq("1D"), has_price=False).frame["quantity"].tolist() == [0.0]


@pytest.mark.parametrize(
    ("freq", "n_buckets"),
    [("1h", 57), ("1D", 3), ("1W", 1)],
)
def test_other_frequencies(freq: str, n_buckets: int) -> None:
    lines, _ = clean_lines(retail_lines(), columns=RETAIL)
    panel = bucketize(lines, parse_freq(freq), has_price=True)
    assert panel.n_buckets == n_buckets
    total = lines["quantity"].sum()
    assert panel.frame["quantity"].sum() == pytest.approx(total)


def test_timezones_are_converted_to_utc() -> None:
    frame = pd.DataFrame(
        {
            "item_id": ["a", "a"],
            "ts": ["2011-01-01T23:30:00-02:00", "2011-01-02T00:10:00Z"],
            "quantity": [1, 1],
        }
    )
    lines, _ = clean_lines(frame)
    panel = bucketize(lines, parse_freq("1D"), has_price=False)
    assert panel.frame["quantity"].tolist() == [2.0]  # both on 2011-01-02 UTC


def test_min_active_filter() -> None:
    lines, _ = clean_lines(retail_lines(), columns=RETAIL)
    panel = bucketize(lines, parse_freq("1D"), has_price=True, min_active=2)
    assert panel.frame["item_id"].unique().tolist() == ["85048"]
    with pytest.raises(DataError, match="at least 9 selling buckets"):
        bucketize(lines, parse_freq("1D"), has_price=True, min_active=9)


def test_missing_columns_name_what_was_found() -> None:
    expected = r"missing column\(s\) item_id, ts.*columns found: InvoiceNo, StockCode"
    with pytest.raises(DataError, match=expected):
        clean_lines(retail_lines())


def test_unparsable_timestamp_names_row_and_value() -> None:
    bad = retail_lines()
    bad.loc[3, "InvoiceDate"] = "yesterday-ish"
    with pytest.raises(DataError, match=r"row 4: 'yesterday-ish'"):
        clean_lines(bad, columns=RETAIL)


@pytest.mark.parametrize("value", [np.nan, np.inf, "many"])
def test_non_finite_quantity(value: object) -> None:
    bad = retail_lines().astype({"Quantity": object})
    bad.loc[1, "Quantity"] = value
    with pytest.raises(DataError, match=r"quantity must be a finite number.*row 2"):
        clean_lines(bad, columns=RETAIL)


def test_no_items_left_after_filter() -> None:
    with pytest.raises(DataError, match="no items left after filtering"):
        clean_lines(retail_lines(), columns=RETAIL, item_pattern="^ZZZ")


def test_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_sales(tmp_path / "nope.csv", parse_freq("1D"))
    odd = tmp_path / "sales.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="expected a .csv"):
        load_sales(odd, parse_freq("1D"))


def test_csv_and_parquet_read_the_same(tmp_path: Path) -> None:
    raw = retail_lines()
    raw.to_csv(tmp_path / "s.csv", index=False)
    raw.to_parquet(tmp_path / "s.parquet")
    a = load_sales(tmp_path / "s.csv", parse_freq("1D"), columns=RETAIL).frame
    b = load_sales(tmp_path / "s.parquet", parse_freq("1D"), columns=RETAIL).frame
    pd.testing.assert_frame_equal(a, b)


def test_shipped_sample_is_small_and_loads() -> None:
    path = sample_data_path()
    assert path.stat().st_size < 1 << 20
    panel = load_sales(path, parse_freq("1D"))
    assert panel.n_items == 40
    assert panel.has_price
    assert panel.end == pd.Timestamp("2011-08-31")
