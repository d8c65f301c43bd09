"""The admin's usage report (SPEC section 13): usage by model and by day, credits billed,
provider cost and margin, with date and user filters and a chart of the last 30 days."""

import datetime
import re
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing_app import usage_report
from billing_app.models import UsageRecord

REPORT = "/admin/billing_app/usagerecord/report/"
UTC = datetime.UTC
D = datetime.date


def record(user, model, when, *, cost, provider_cost=None, prompt=100, completion=50, estimated=False,
           reconciled=False) -> UsageRecord:
    return UsageRecord.objects.create(
        user=user, session_id=uuid.uuid4(), turn_id=uuid.uuid4(), model=model, prompt_tokens=prompt,
        completion_tokens=completion, total_tokens=prompt + completion, estimated=estimated, reconciled=reconciled,
        cost=Decimal(cost), provider_cost=None if provider_cost is None else Decimal(provider_cost), created_at=when)


def at(day: datetime.date, hour: int = 12, minute: int = 0, second: int = 0) -> datetime.datetime:
    return datetime.datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def spread(alice, bob):
    """Usage of two users on three models over 1-6 March 2025, some without a provider cost."""
    n = 0
    for offset in range(6):
        day = D(2025, 3, 1) + datetime.timedelta(days=offset)
        for model in ("anthropic/claude", "openai/gpt", "meta/llama"):
            for user in (alice, bob):
                n += 1
                if (n % 3) == 0 and model == "meta/llama":
                    continue  # some (day, model) groups hold one record only
                record(user, model, at(day, hour=n % 24), cost=f"{n}.123456", prompt=100 + n, completion=10 * n,
                       provider_cost=None if n % 4 == 0 else f"{n * 0.9:.6f}", estimated=n % 5 == 0,
                       reconciled=n % 10 == 0)


def expected_rows(start, end, user_id=None) -> dict:
    """The report's rows, computed in Python from every record in the database."""
    groups: dict = defaultdict(list)
    for r in UsageRecord.objects.all():
        day = timezone.localtime(r.created_at).date()
        if start <= day <= end and (user_id is None or r.user_id == user_id):
            groups[(day, r.model)].append(r)
    result = {}
    for key, recs in groups.items():
        priced = [r for r in recs if r.provider_cost is not None]
        result[key] = {
            "turns": len(recs),
            "prompt_tokens": sum(r.prompt_tokens for r in recs),
            "completion_tokens": sum(r.completion_tokens for r in recs),
            "billed": sum(r.cost for r in recs),
            "provider_cost": sum(r.provider_cost for r in priced) if priced else None,
            "margin": sum(r.cost - r.provider_cost for r in priced) if priced else None,
            "without_provider_cost": len(recs) - len(priced),
            "on_estimate": sum(1 for r in recs if r.estimated and not r.reconciled),
        }
    return result


def as_dict(row: usage_report.Row) -> dict:
    return {"turns": row.turns, "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
            "billed": row.billed, "provider_cost": row.provider_cost, "margin": row.margin,
            "without_provider_cost": row.without_provider_cost, "on_estimate": row.on_estimate}


@pytest.mark.parametrize("by_user", [False, True])
def test_rows_equal_sums_computed_from_the_records(spread, bob, by_user):
    start, end = D(2025, 3, 2), D(2025, 3, 4)
    user_id = bob.pk if by_user else None
    rows = usage_report.usage_by_model_and_day(start, end, user_id)
    expected = expected_rows(start, end, user_id)
    assert {(r.day, r.model): as_dict(r) for r in rows} == expected
    assert len(rows) == len(expected) >= 6  # 3 days, 2 or 3 models each
    # Newest day first, then by model.
    assert [(r.day, r.model) for r in rows] == sorted(expected, key=lambda k: (-k[0].toordinal(), k[1]))
    assert all(r.billed.as_tuple().exponent == -6 for r in rows)  # money as stored: 6 places

    report = usage_report.usage_report(start, end, user_id)
    totals = report.totals
    assert totals.turns == sum(e["turns"] for e in expected.values())
    assert totals.billed == sum(e["billed"] for e in expected.values())
    assert totals.provider_cost == sum(e["provider_cost"] or 0 for e in expected.values())
    assert totals.margin == sum(e["margin"] or 0 for e in expected.values())
    assert totals.without_provider_cost == sum(e["without_provider_cost"] for e in expected.values()) > 0
    assert totals.on_estimate == sum(e["on_estimate"] for e in expected.values())
    per_model = {r.model: r.billed for r in report.models}
    assert per_model == {m: sum(e["billed"] for (_, model), e in expected.items() if model == m)
                         for m in {model for _, model in expected}}


def test_days_outside_the_range_are_left_out(alice):
    start, end = D(2025, 3, 10), D(2025, 3, 11)
    record(alice, "m", at(D(2025, 3, 9), 23, 59, 59), cost="1")  # the day before
    record(alice, "m", at(start, 0, 0, 0), cost="2")  # the first instant of the range
    record(alice, "m", at(end, 23, 59, 59), cost="4")  # the last second of the range
    record(alice, "m", at(D(2025, 3, 12), 0, 0, 0), cost="8")  # the day after
    rows = usage_report.usage_by_model_and_day(start, end)
    assert [(r.day, r.billed) for r in rows] == [(end, Decimal("4.000000")), (start, Decimal("2.000000"))]
    assert usage_report.usage_report(start, end).totals.billed == Decimal("6")


def test_margin_counts_only_the_records_the_provider_priced(alice):
    day = D(2025, 4, 1)
    record(alice, "priced", at(day), cost="1.5", provider_cost="1.2")
    record(alice, "priced", at(day), cost="2", provider_cost=None)
    record(alice, "unpriced", at(day), cost="3", provider_cost=None)
    priced, unpriced = usage_report.usage_by_model_and_day(day, day)
    assert (priced.billed, priced.provider_cost, priced.margin) == (Decimal("3.5"), Decimal("1.2"), Decimal("0.3"))
    assert priced.without_provider_cost == 1 and priced.margin_is_partial
    assert unpriced.provider_cost is None and unpriced.margin is None and unpriced.without_provider_cost == 1


def test_report_page_for_staff(admin_client, spread):
    response = admin_client.get(REPORT, {"start": "2025-03-02", "end": "2025-03-04"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "<title>2025-03-02 to 2025-03-04 | Usage report |" in page
    for model in ("anthropic/claude", "openai/gpt", "meta/llama"):
        assert model in page
    totals = usage_report.usage_report(D(2025, 3, 2), D(2025, 3, 4)).totals
    # The totals rows of both tables ("by model", then "by day and model", which has a model column).
    by_model, by_day = re.findall(r'<tr class="totals"><td>Total</td>(.*?)</tr>', page, re.S)
    for row, skip in ((by_model, 0), (by_day, 1)):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[skip:]
        assert cells[:5] == [str(totals.turns), str(totals.prompt_tokens), str(totals.completion_tokens),
                             str(totals.billed), str(totals.provider_cost)]
        assert cells[5] == f"{totals.margin}*"  # some records have no provider cost
        assert cells[6:8] == [str(totals.without_provider_cost), str(totals.on_estimate)]
    # A day outside the range is not in the table.
    assert "2025-03-05" not in page and "2025-03-01" not in page


def test_report_is_linked_from_the_usage_changelist(admin_client):
    page = admin_client.get("/admin/billing_app/usagerecord/").content.decode()
    assert f'href="{REPORT}"' in page


def test_report_is_staff_only(client, alice):
    response = client.get(REPORT)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.login(username="alice", password="pw")  # not staff
    response = client.get(REPORT)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("query, error", [
    ({"start": "not-a-date"}, "Enter a valid date."),
    ({"end": "2025-02-30"}, "Enter a valid date."),
    ({"start": "2025-03-05", "end": "2025-03-01"}, "The start date is after the end date."),
    ({"end": "9999-12-31"}, "Enter a date from 1970-01-01 to 9998-12-31."),
])
def test_a_bad_date_is_a_form_error(admin_client, spread, query, error):
    response = admin_client.get(REPORT, query)
    assert response.status_code == 200
    page = response.content.decode()
    assert error in page and "Please correct the error below." in page
    assert "Showing the last 30 days instead." in page


def test_user_filter_by_name_or_id(admin_client, spread, alice, bob):
    dates = {"start": "2025-03-01", "end": "2025-03-06"}
    expected = usage_report.usage_report(D(2025, 3, 1), D(2025, 3, 6), bob.pk).totals
    for wanted in ("bob", str(bob.pk)):
        response = admin_client.get(REPORT, {**dates, "user": wanted})
        assert response.context["report_user"] == bob
        assert response.context["report"].totals == expected
    assert expected.billed != usage_report.usage_report(D(2025, 3, 1), D(2025, 3, 6)).totals.billed


def test_unknown_user_gives_an_empty_report(admin_client, spread):
    response = admin_client.get(REPORT, {"start": "2025-03-01", "end": "2025-03-06", "user": "nobody"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "No user “nobody”: the report is empty." in page
    assert response.context["report"].rows == [] and response.context["report"].totals.turns == 0
    assert "anthropic/claude" not in page


def test_a_user_name_the_form_refuses_gives_an_empty_report(admin_client, spread):
    response = admin_client.get(REPORT, {"start": "2025-03-01", "end": "2025-03-06", "user": "al\x00ice"})
    assert response.status_code == 200
    assert "Null characters are not allowed." in response.content.decode()
    assert response.context["unknown_user"] and response.context["report"].rows == []


def test_the_chart_shows_the_last_30_days_and_escapes_text(admin_client, make_user):
    evil = make_user("<b>eve</b>")
    today = timezone.localdate()
    record(evil, "<script>x</script>", timezone.now(), cost="2", provider_cost="1.5")
    record(evil, "plain/model", timezone.now() - datetime.timedelta(days=3), cost="1")
    record(evil, "too/old", timezone.now() - datetime.timedelta(days=31), cost="100")
    page = admin_client.get(REPORT, {"user": "<b>eve</b>"}).content.decode()
    svg = re.search(r'<svg class="usage-chart".*?</svg>', page, re.S).group(0)
    assert svg.count('class="slot"') == 30
    assert "<script>" not in page and "<b>eve</b>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;: 2.000000 billed, 1.500000 provider cost" in svg
    assert "&lt;b&gt;eve&lt;/b&gt;" in svg
    assert "too/old" not in svg
    assert f"{today:%m-%d}" in svg  # the last day is labelled
    heights = [float(h) for h in re.findall(r'class="bar bar-billed" x="[\d.]+" y="[\d.]+" width="[\d.]+" '
                                            r'height="([\d.]+)"', svg)]
    assert len(heights) == 30 and heights[-1] == 2 * heights[-4] > 0  # 2 credits today, 1 three days ago


def test_chart_geometry():
    days = [usage_report.DayTotal(day=D(2025, 1, 1) + datetime.timedelta(days=i), turns=1,
                                  billed=Decimal(i), provider_cost=None if i == 0 else Decimal(i) / 2, models=[])
            for i in range(4)]
    chart = usage_report.chart(days)
    assert chart.max_value == Decimal(5)  # 3 rounded up to a round number
    assert [t.label for t in chart.ticks] == ["0", "1.25", "2.5", "3.75", "5"]
    billed = [d.bars[0] for d in chart.days]
    assert billed[0].height == 0
    assert billed[3].height == pytest.approx(chart.plot_height * 3 / 5, abs=0.1)
    assert all(b.y + b.height == pytest.approx(chart.bottom, abs=0.1) for b in billed)
    assert usage_report.chart([]).max_value == 1


def test_on_estimate_turns_are_counted_and_linked(admin_client, alice):
    day = D(2025, 5, 1)
    record(alice, "m", at(day), cost="1", estimated=True)  # still on an estimate
    record(alice, "m", at(day), cost="1", estimated=True, reconciled=True)
    record(alice, "m", at(day), cost="1")
    response = admin_client.get(REPORT, {"start": "2025-05-01", "end": "2025-05-01"})
    assert response.context["report"].totals.on_estimate == 1
    turns_url = response.context["on_estimate_turns_url"]
    assert turns_url.startswith("/admin/sessions_app/turn/?")
    assert "reconciliation__in=pending%2Cunreconciled" in turns_url
    assert admin_client.get(turns_url).status_code == 200
    usage_url = response.context["on_estimate_usage_url"]
    assert len(admin_client.get(usage_url).context["cl"].result_list) == 1


def test_report_queries_do_not_grow_with_the_rows(admin_client, alice, bob):
    now = timezone.now()

    def queries(**params) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(REPORT, params).status_code == 200
        return len(captured)

    record(alice, "one/model", now, cost="1")
    few = queries()
    few_for_user = queries(user="alice")
    for i in range(150):
        record(alice if i % 2 else bob, f"model/{i % 7}", now - datetime.timedelta(hours=5 * i), cost="0.5",
               provider_cost=None if i % 3 else "0.4", estimated=i % 4 == 0)
    assert queries() == few
    assert queries(user="alice") == few_for_user


def test_report_query_budget(admin_client, alice, django_assert_max_num_queries):
    now = timezone.now()
    for i in range(200):
        record(alice, f"model/{i % 9}", now - datetime.timedelta(hours=3 * i), cost="0.25", provider_cost="0.2")
    # Session and user of the request, the user filter, the table, the chart.
    with django_assert_max_num_queries(5):
        response = admin_client.get(REPORT, {"user": "alice"})
    assert response.context["report"].totals.turns == sum(
        1 for r in UsageRecord.objects.all()
        if timezone.localdate() - datetime.timedelta(days=29) <= timezone.localtime(r.created_at).date())
