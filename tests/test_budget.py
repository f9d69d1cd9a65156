"""Budget strings: BitOPs, size, ratio; malformed values fail with a UserError naming them."""
import pytest

from mpq.errors import UserError
from search.budget import format_bitops, format_bytes, parse_budget, parse_budget_list


@pytest.mark.parametrize("text, kind, value", [
    ("22.8G", "bitops", 22.8e9), ("34.7G", "bitops", 34.7e9), ("1.5e9", "bitops", 1.5e9),
    ("500M", "bitops", 500e6), ("14.4g", "bitops", 14.4e9), ("2T", "bitops", 2e12),
    ("800K", "bitops", 800e3), ("22.8GBitOPs", "bitops", 22.8e9), ("31.6GBOPs", "bitops", 31.6e9),
    ("2.5MB", "size", 2.5e6), ("800KB", "size", 800e3), ("1.2MiB", "size", 1.2 * 1024 ** 2),
    ("3GB", "size", 3e9), ("512KiB", "size", 512 * 1024), ("100B", "size", 100.0),
    ("0.2", "ratio", 0.2), ("1", "ratio", 1.0), (".5", "ratio", 0.5),
])
def test_valid_budgets(text, kind, value):
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value)
    assert b.text == text


@pytest.mark.parametrize("text", ["3 GB", "-1", "abc", "0", "", " ", "0.0", "-0.5", "1e400", "nan",
                                  "inf", "22.8 G", "5x", "G", "MB", "iB", "1.2.3G", "+-1"])
def test_malformed_budgets_name_value_and_formats(text):
    with pytest.raises(UserError) as exc:
        parse_budget(text)
    msg = str(exc.value)
    assert repr(text) in msg
    assert "accepted formats" in msg and "22.8G" in msg and "2.5MB" in msg and "0.2" in msg
    assert "\n" not in msg


def test_kind_is_enforced_where_required():
    assert parse_budget("2.5MB", "size").value == 2.5e6
    assert parse_budget("2500000", "size").kind == "size"   # a bare number is a byte count there
    assert parse_budget("0.25", "ratio").value == 0.25
    with pytest.raises(UserError, match="size budget is expected"):
        parse_budget("22.8G", "size")
    with pytest.raises(UserError, match="ratio"):
        parse_budget("1.5", "ratio")
    with pytest.raises(UserError, match="bitops budget is expected"):
        parse_budget("2.5MB", "bitops")
    with pytest.raises(UserError):
        parse_budget(3.0)


def test_budget_list():
    bs = parse_budget_list("34.7G,22.8G,14.4G")
    assert [b.value for b in bs] == pytest.approx([34.7e9, 22.8e9, 14.4e9])
    assert [b.kind for b in parse_budget_list("1G,2MB,0.3")] == ["bitops", "size", "ratio"]
    for bad in ("", "1G,,2G", "1G, 2G", "1G,abc"):
        with pytest.raises(UserError):
            parse_budget_list(bad)


def test_formatting():
    assert format_bitops(22.85e9) == "22.85G"
    assert format_bitops(500e6) == "500M"
    assert format_bytes(2.5e6) == "2.5MB"
    assert format_bytes(12) == "12B"
    assert parse_budget("22.8G").describe() == "22.8G BitOPs"
