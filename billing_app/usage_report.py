"""The admin's usage report (SPEC section 13): usage by model and by day, what it was billed,
what the provider says it cost, and the margin between the two.

Plain functions over `UsageRecord`, aggregated in the database (one query each, whatever
the number of records). Days are calendar days in the current time zone, and a range
`start`..`end` includes both days. Credits and the provider's cost are in the same unit, so
the margin is billed minus provider cost; it is computed over the records that have a
provider cost only (a record the provider never priced has no margin to speak of), and
each row says how many records lack one.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import defaultdict
from collections.abc import Iterable
from decimal import Decimal

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing_app.models import MONEY, UsageRecord

CENT = Decimal(1).scaleb(-MONEY["decimal_places"])  # 0.000001: money is shown as stored
ZERO = Decimal("0").quantize(CENT)


def money(value: Decimal | None) -> Decimal:
    return (value or ZERO).quantize(CENT)


@dataclasses.dataclass(frozen=True)
class Row:
    """Usage of one model on one day (or, with `day` None or `model` "", a sum of rows)."""

    day: datetime.date | None
    model: str
    turns: int  # usage records: one per billed turn
    prompt_tokens: int
    completion_tokens: int
    billed: Decimal  # credits billed (sum of `cost`)
    provider_cost: Decimal | None  # sum of `provider_cost`; None if no record has one
    billed_with_provider_cost: Decimal  # credits billed on the records that have a provider cost
    without_provider_cost: int  # records with no provider cost
    on_estimate: int  # records billed on an estimate that was not reconciled (yet)

    @property
    def margin(self) -> Decimal | None:
        """Billed minus provider cost, over the records that have a provider cost."""
        if self.provider_cost is None:
            return None
        return self.billed_with_provider_cost - self.provider_cost

    @property
    def margin_is_partial(self) -> bool:
        """Some records have no provider cost: the margin leaves them out."""
        return self.provider_cost is not None and self.without_provider_cost > 0


def total(rows: Iterable[Row], *, day: datetime.date | None = None, model: str = "") -> Row:
    rows = list(rows)
    priced = [r.provider_cost for r in rows if r.provider_cost is not None]
    return Row(
        day=day, model=model,
        turns=sum(r.turns for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        billed=money(sum((r.billed for r in rows), ZERO)),
        provider_cost=money(sum(priced, ZERO)) if priced else None,
        billed_with_provider_cost=money(sum((r.billed_with_provider_cost for r in rows), ZERO)),
        without_provider_cost=sum(r.without_provider_cost for r in rows),
        on_estimate=sum(r.on_estimate for r in rows),
    )


def day_bounds(start: datetime.date, end: datetime.date) -> tuple[datetime.datetime, datetime.datetime]:
    """[start 00:00, the day after end 00:00) in the current time zone."""
    tz = timezone.get_current_timezone()
    return (datetime.datetime.combine(start, datetime.time.min, tzinfo=tz),
            datetime.datetime.combine(end + datetime.timedelta(days=1), datetime.time.min, tzinfo=tz))


def records(start: datetime.date, end: datetime.date, user_id: int | None = None) -> QuerySet[UsageRecord]:
    """The usage records created from `start` to `end` (both days included)."""
    since, until = day_bounds(start, end)
    qs = UsageRecord.objects.filter(created_at__gte=since, created_at__lt=until)
    if user_id is not None:
        qs = qs.filter(user_id=user_id)
    return qs


def _grouped(qs: QuerySet[UsageRecord]) -> list[Row]:
    """One query: the records grouped by day and model, newest day first."""
    has_cost = Q(provider_cost__isnull=False)
    grouped = (
        qs.annotate(day=TruncDate("created_at")).values("day", "model")
        .annotate(
            n_turns=Count("id"),
            n_prompt=Sum("prompt_tokens"),
            n_completion=Sum("completion_tokens"),
            sum_billed=Sum("cost"),
            sum_provider=Sum("provider_cost"),
            sum_billed_priced=Sum("cost", filter=has_cost),
            n_unpriced=Count("id", filter=~has_cost),
            n_on_estimate=Count("id", filter=Q(estimated=True, reconciled=False)),
        )
        .order_by("-day", "model")
    )
    return [
        Row(day=g["day"], model=g["model"], turns=g["n_turns"], prompt_tokens=g["n_prompt"] or 0,
            completion_tokens=g["n_completion"] or 0, billed=money(g["sum_billed"]),
            provider_cost=None if g["sum_provider"] is None else money(g["sum_provider"]),
            billed_with_provider_cost=money(g["sum_billed_priced"]), without_provider_cost=g["n_unpriced"],
            on_estimate=g["n_on_estimate"])
        for g in grouped
    ]


def usage_by_model_and_day(start: datetime.date, end: datetime.date, user_id: int | None = None) -> list[Row]:
    """Usage per (day, model) from `start` to `end` inclusive, newest day first, then by
    model name. One query."""
    return _grouped(records(start, end, user_id))


def by_model(rows: Iterable[Row]) -> list[Row]:
    """The rows summed per model (no query), most billed first."""
    per_model: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        per_model[row.model].append(row)
    return sorted((total(group, model=model) for model, group in per_model.items()),
                  key=lambda r: (-r.billed, r.model))


@dataclasses.dataclass(frozen=True)
class Report:
    start: datetime.date
    end: datetime.date
    rows: list[Row]  # per day and model
    models: list[Row]  # per model, over the range
    totals: Row


def usage_report(start: datetime.date, end: datetime.date, user_id: int | None = None) -> Report:
    """Everything the report's tables show, in one query."""
    rows = usage_by_model_and_day(start, end, user_id)
    return Report(start=start, end=end, rows=rows, models=by_model(rows), totals=total(rows))


def empty_report(start: datetime.date, end: datetime.date) -> Report:
    return Report(start=start, end=end, rows=[], models=[], totals=total([]))


# --- The chart: the last 30 days ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DayTotal:
    day: datetime.date
    turns: int
    billed: Decimal
    provider_cost: Decimal | None  # None when no record of the day has one
    models: list[Row]  # the day's usage per model, most billed first


def last_days(days: int = 30, today: datetime.date | None = None) -> tuple[datetime.date, datetime.date]:
    """The first and last day of the `days` days that end today (inclusive)."""
    today = today or timezone.localdate()
    return today - datetime.timedelta(days=days - 1), today


def daily_totals(days: int = 30, user_id: int | None = None, today: datetime.date | None = None,
                 *, empty: bool = False) -> list[DayTotal]:
    """Each of the last `days` days (ending today), oldest first, days without usage
    included as zeros. One query (none with `empty`, e.g. for a user who does not exist)."""
    start, end = last_days(days, today)
    rows = [] if empty else usage_by_model_and_day(start, end, user_id)
    per_day: dict[datetime.date, list[Row]] = defaultdict(list)
    for row in rows:
        per_day[row.day].append(row)
    result = []
    for offset in range(days):
        day = start + datetime.timedelta(days=offset)
        day_rows = per_day.get(day, [])
        summed = total(day_rows, day=day)
        result.append(DayTotal(day=day, turns=summed.turns, billed=summed.billed,
                               provider_cost=summed.provider_cost, models=by_model(day_rows)))
    return result


@dataclasses.dataclass(frozen=True)
class Bar:
    kind: str  # "billed" or "provider"
    x: float
    y: float
    width: float
    height: float


@dataclasses.dataclass(frozen=True)
class ChartDay:
    total: DayTotal
    bars: list[Bar]
    slot_x: float  # the day's slot (hover target for its tooltip)
    slot_width: float
    label: str  # "" for days whose date is not written under the axis
    label_x: float


@dataclasses.dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclasses.dataclass(frozen=True)
class Chart:
    """Geometry of a bar chart of credits billed and provider cost per day, drawn as SVG by
    the template (which escapes every text in it)."""

    width: int
    height: int
    left: int
    top: int
    right: int
    bottom: int  # y of the axis
    days: list[ChartDay]
    ticks: list[Tick]
    max_value: Decimal

    @property
    def plot_height(self) -> int:
        return self.bottom - self.top

    @property
    def first_day(self) -> datetime.date | None:
        return self.days[0].total.day if self.days else None

    @property
    def last_day(self) -> datetime.date | None:
        return self.days[-1].total.day if self.days else None


def _nice_ceiling(value: Decimal) -> Decimal:
    """The smallest 1, 2, 2.5 or 5 x 10^k not below `value` (1 for zero), so ticks at
    quarters of it are round numbers."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for step in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10)):
        candidate = step.scaleb(exponent)
        if candidate >= value:
            return candidate
    return Decimal(10).scaleb(exponent)  # not reached


def _plain(value: Decimal) -> str:
    """A tick label: no exponent, no trailing zeros."""
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def chart(days: list[DayTotal], *, width: int = 760, height: int = 220) -> Chart:
    left, right, top, bottom_margin = 64, 8, 10, 24
    bottom = height - bottom_margin
    plot_height = bottom - top
    max_value = _nice_ceiling(max([max(d.billed, d.provider_cost or ZERO) for d in days], default=ZERO))
    slot = (width - left - right) / max(len(days), 1)
    bar_width = max(slot * 0.38, 1.0)

    def bar(kind: str, x: float, value: Decimal) -> Bar:
        h = float(max(value, ZERO) / max_value) * plot_height
        return Bar(kind=kind, x=round(x, 1), y=round(bottom - h, 1), width=round(bar_width, 1), height=round(h, 1))

    chart_days = []
    for i, d in enumerate(days):
        x = left + i * slot
        inner = x + (slot - 2 * bar_width) / 2
        labelled = i % 5 == 0 or i == len(days) - 1
        chart_days.append(ChartDay(
            total=d, bars=[bar("billed", inner, d.billed), bar("provider", inner + bar_width, d.provider_cost or ZERO)],
            slot_x=round(x, 1), slot_width=round(slot, 1), label=d.day.strftime("%m-%d") if labelled else "",
            label_x=round(x + slot / 2, 1)))
    ticks = [Tick(y=round(bottom - plot_height * i / 4, 1), label=_plain(max_value * i / 4)) for i in range(5)]
    return Chart(width=width, height=height, left=left, top=top, right=width - right, bottom=bottom,
                 days=chart_days, ticks=ticks, max_value=max_value)
