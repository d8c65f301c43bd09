"""Budget periods (SPEC section 16: calendar periods in UTC) and a key's spend in them
(billing_app.selectors.period_start, key_spend)."""

import datetime
import uuid
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from accounts.models import ApiKey
from billing_app.models import UsageRecord
from billing_app.selectors import key_spend, key_spend_this_period, period_start, with_spend_this_period
from tests.conftest import MODEL

UTC = datetime.UTC


def at(*args) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("period, now, start", [
    # The last instant of a year and the first of the next.
    ("day", at(2026, 12, 31, 23, 59, 59, 999999), at(2026, 12, 31)),
    ("day", at(2027, 1, 1), at(2027, 1, 1)),
    ("week", at(2026, 12, 31, 23, 59, 59), at(2026, 12, 28)),  # a Thursday: that Monday
    ("week", at(2027, 1, 1), at(2026, 12, 28)),  # a week across the new year
    ("month", at(2026, 12, 31, 23, 59, 59), at(2026, 12, 1)),
    ("month", at(2027, 1, 1), at(2027, 1, 1)),
    # A Sunday is the last day of its week; Monday 00:00 starts the next.
    ("week", at(2026, 12, 6, 23, 59, 59, 999999), at(2026, 11, 30)),
    ("week", at(2026, 12, 7), at(2026, 12, 7)),
    ("week", at(2026, 12, 7, 0, 0, 0, 1), at(2026, 12, 7)),
    # Month ends: 28, 29, 30 and 31 days.
    ("month", at(2027, 2, 28, 23, 59, 59), at(2027, 2, 1)),
    ("month", at(2027, 3, 1), at(2027, 3, 1)),
    ("month", at(2028, 2, 29, 12), at(2028, 2, 1)),
    ("month", at(2026, 4, 30, 23, 59, 59), at(2026, 4, 1)),
    ("month", at(2026, 5, 31, 23, 59, 59), at(2026, 5, 1)),
    # Empty (a key without a budget): today in UTC.
    ("", at(2026, 12, 1, 15, 30), at(2026, 12, 1)),
])
def test_period_start(period, now, start):
    assert period_start(period, now) == start


def test_total_is_since_ever():
    assert period_start("total", at(2026, 12, 1)) is None


def test_periods_are_utc_whatever_the_clock_zone():
    # 01:30 on a Monday in Paris is still Sunday in UTC: the UTC day and week.
    paris = datetime.datetime(2026, 12, 7, 0, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert period_start("day", paris) == at(2026, 12, 6)
    assert period_start("week", paris) == at(2026, 11, 30)
    assert period_start("month", datetime.datetime(2027, 1, 1, 0, 30, tzinfo=ZoneInfo("Europe/Paris"))) == \
        at(2026, 12, 1)
    assert period_start("day", at(2026, 12, 7)).tzinfo == UTC


def test_an_unknown_period_is_an_error():
    with pytest.raises(ValueError):
        period_start("year", at(2026, 12, 1))


def _usage(user, key_id, cost: str, created_at: datetime.datetime) -> None:
    UsageRecord.objects.create(user=user, session_id=uuid.uuid4(), turn_id=uuid.uuid4(), api_key_id=key_id,
                               model=MODEL, prompt_tokens=1, completion_tokens=1, total_tokens=2,
                               cost=Decimal(cost), created_at=created_at)


def test_key_spend_sums_the_key_usage_from_since(alice):
    key, other = ApiKey.issue(user=alice)[0], ApiKey.issue(user=alice)[0]
    _usage(alice, key.pk, "1.000001", at(2026, 12, 31, 23, 59, 59, 999999))
    _usage(alice, key.pk, "0.5", at(2027, 1, 1))
    _usage(alice, key.pk, "0.25", at(2027, 1, 1, 8))
    _usage(alice, other.pk, "9", at(2027, 1, 1, 9))
    _usage(alice, None, "9", at(2027, 1, 1, 9))
    assert key_spend(key.pk, at(2027, 1, 1)) == Decimal("0.75")
    assert key_spend(key.pk, None) == Decimal("1.750001")
    assert key_spend(key.pk, at(2027, 1, 2)) == Decimal("0")
    assert key_spend(uuid.uuid4(), None) == Decimal("0")


@pytest.mark.parametrize("period, expected", [
    ("day", "0.250000"), ("week", "0.750000"), ("month", "0.250000"), ("total", "1.750001"), (None, "0.250000"),
])
def test_spend_this_period_rolls_over_at_the_period_start(alice, period, expected):
    key = ApiKey.issue(user=alice)[0]
    if period:
        key.budget, key.budget_period = Decimal(5), period
        key.save()
    _usage(alice, key.pk, "1.000001", at(2026, 11, 29, 23, 59, 59))  # a Sunday: the week and month before
    _usage(alice, key.pk, "0.5", at(2026, 11, 30))  # Monday 00:00
    _usage(alice, key.pk, "0", at(2026, 12, 1))  # a Tuesday
    _usage(alice, key.pk, "0.25", at(2026, 12, 3, 0, 0))  # a Thursday
    now = at(2026, 12, 3, 12)
    assert key_spend_this_period(key, now) == Decimal(expected)
    annotated = with_spend_this_period(ApiKey.objects.filter(pk=key.pk), now).get()
    assert annotated.spent_this_period == Decimal(expected)
