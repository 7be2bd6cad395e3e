from datetime import date, datetime, timedelta, timezone

from hypothesis import given, strategies as st

from exchange.mapping.values import Precision, parse_ts, timestamp


def test_precisions():
    assert parse_ts("1962") == (date(1962, 1, 1), Precision.YEAR)
    assert parse_ts("196203") == (date(1962, 3, 1), Precision.MONTH)
    assert parse_ts("19620315") == (date(1962, 3, 15), Precision.DAY)
    assert parse_ts("1962031512") == (datetime(1962, 3, 15, 12), Precision.HOUR)
    assert parse_ts("196203151230") == (datetime(1962, 3, 15, 12, 30), Precision.MINUTE)
    assert parse_ts("19620315123045") == (datetime(1962, 3, 15, 12, 30, 45), Precision.SECOND)
    assert parse_ts("19620315123045.25") == (datetime(1962, 3, 15, 12, 30, 45, 250000), Precision.FRACTION)


def test_offsets():
    value, precision = parse_ts("198808181126+0215")
    assert value == datetime(1988, 8, 18, 11, 26, tzinfo=timezone(timedelta(hours=2, minutes=15)))
    assert precision is Precision.MINUTE
    value, _ = parse_ts("20210817151943.4-0500")
    assert value.utcoffset() == -timedelta(hours=5) and value.microsecond == 400000


def test_junk_seen_in_the_wild():
    assert parse_ts("20110613122406637") == (datetime(2011, 6, 13, 12, 24, 6, 637000), Precision.FRACTION)
    assert parse_ts("1928-01-01") == (date(1928, 1, 1), Precision.DAY)
    assert parse_ts("2021-08-17T15:19:43Z")[0] == datetime(2021, 8, 17, 15, 19, 43, tzinfo=timezone.utc)
    for bad in ("", "   ", "196203520", "20240230", "junk", "+0200", "2024-", "19620315+99", "YYYYMMDD",
                "20240101120000.\u0661\u0662", "20240101120000.\u00b2"):  # digits of other scripts
        assert parse_ts(bad) == (None, None), bad
    assert timestamp("196203520") is None
    assert timestamp("1962").isoformat() == "1962"


@given(st.text(max_size=40))
def test_never_raises(text):
    value, precision = parse_ts(text)
    assert (value is None) == (precision is None)


@given(st.from_regex(r"\A[0-9]{4,18}(\.[0-9]{0,5})?([+-][0-9]{2,4})?\Z"))
def test_never_raises_on_digit_soup(text):
    parse_ts(text)
