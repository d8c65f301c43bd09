"""The login rate limit (accounts.login_limit): per username and per client address, on the
chat page's login and the admin's, counted in the database."""

from __future__ import annotations

import datetime

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, RequestFactory
from django.utils import timezone

from accounts import login_limit
from accounts.models import LoginAttempt
from tests.conftest import in_threads

LOGIN = "/accounts/login/"


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.PANTHEON_LOGIN_FAILURES_PER_USER = 5
    settings.PANTHEON_LOGIN_FAILURES_PER_IP = 20
    settings.PANTHEON_LOGIN_WINDOW_SECONDS = 900
    settings.PANTHEON_TRUSTED_PROXY_COUNT = 0


def log_in(username: str, password: str, *, ip: str = "10.0.0.1", client: Client | None = None, path=LOGIN,
           **headers):
    client = client or Client(REMOTE_ADDR=ip)
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=ip, **headers)


def logged_in(response) -> bool:
    return response.status_code == 302


def test_five_failures_lock_the_username_and_the_right_password_is_not_checked(alice):
    for _ in range(5):
        response = log_in("alice", "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    refused = log_in("alice", "pw")
    assert refused.status_code == 429
    assert 890 <= int(refused["Retry-After"]) <= 900
    page = refused.content.decode()
    assert "Too many failed login attempts for this username. Please wait 15 minutes and try again." in page
    assert 'data-testid="login-error"' in page and 'name="password"' in page  # the form is still there
    assert "_auth_user_id" not in refused.client.session
    # Another address does not help: the lock is the username's.
    assert log_in("alice", "pw", ip="10.9.9.9").status_code == 429
    # Refused attempts are not stored: they do not lengthen the lock.
    assert LoginAttempt.objects.filter(username="alice").count() == 5


def test_a_username_is_counted_whatever_its_case(alice):
    for name in ("Alice", "ALICE", "alice", "aLiCe", "alicE"):
        log_in(name, "wrong")
    assert log_in("alice", "pw").status_code == 429


def test_a_success_clears_the_username_count(alice):
    for _ in range(4):
        log_in("alice", "wrong")
    assert logged_in(log_in("alice", "pw"))
    assert not LoginAttempt.objects.filter(username="alice").exists()
    for _ in range(4):
        assert log_in("alice", "wrong").status_code == 200
    assert logged_in(log_in("alice", "pw"))
    # The failures still count for the address they came from.
    assert LoginAttempt.objects.filter(ip="10.0.0.1").count() == 8


def test_failures_older_than_the_window_no_longer_count(alice, settings):
    for _ in range(5):
        log_in("alice", "wrong")
    now = timezone.now()
    oldest = LoginAttempt.objects.order_by("created_at").first()
    LoginAttempt.objects.filter(pk=oldest.pk).update(created_at=now - datetime.timedelta(seconds=899))
    LoginAttempt.objects.exclude(pk=oldest.pk).update(created_at=now - datetime.timedelta(seconds=600))
    refused = log_in("alice", "pw")
    assert refused.status_code == 429 and int(refused["Retry-After"]) <= 2
    assert "Please wait 1 minute and try again." in refused.content.decode()
    LoginAttempt.objects.filter(pk=oldest.pk).update(created_at=now - datetime.timedelta(seconds=901))
    assert logged_in(log_in("alice", "pw"))
    assert not LoginAttempt.objects.filter(created_at__lt=now - datetime.timedelta(seconds=900)).exists()


def test_twenty_failures_from_one_address_lock_that_address(make_user):
    make_user("victim")
    for i in range(20):
        assert log_in(f"guess{i}", "wrong", ip="192.0.2.7").status_code == 200
    refused = log_in("victim", "pw", ip="192.0.2.7")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "Too many failed login attempts from your network address." in refused.content.decode()
    # The user is not locked: from elsewhere the right password works.
    assert logged_in(log_in("victim", "pw", ip="192.0.2.8"))


def test_an_ipv6_client_is_counted_by_its_64(make_user):
    make_user("victim")
    for i in range(20):
        log_in(f"guess{i}", "wrong", ip=f"2001:db8:1:2::{i + 1:x}")
    assert log_in("victim", "pw", ip="2001:db8:1:2:ffff::1").status_code == 429
    assert logged_in(log_in("victim", "pw", ip="2001:db8:1:3::1"))


@pytest.mark.parametrize(("proxies", "remote", "forwarded", "expected"), [
    (0, "10.0.0.1", "203.0.113.9", "10.0.0.1"),  # no proxy trusted: the header is the client's to forge
    (1, "127.0.0.1", "203.0.113.9", "203.0.113.9"),
    (1, "127.0.0.1", "1.1.1.1, 203.0.113.9", "203.0.113.9"),  # the first entry was forged
    (2, "127.0.0.1", "1.1.1.1, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
    (2, "127.0.0.1", "203.0.113.9", "127.0.0.1"),  # fewer entries than proxies: not through them
    (1, "127.0.0.1", "not an address", None),
    (0, "::ffff:192.0.2.1", "", "192.0.2.1"),
    (0, "2001:db8::1234:5678:9abc:def0", "", "2001:db8::"),
])
def test_the_client_address(settings, proxies, remote, forwarded, expected):
    settings.PANTHEON_TRUSTED_PROXY_COUNT = proxies
    request = RequestFactory().post(LOGIN, REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)
    assert login_limit.client_address(request) == expected


def test_behind_a_proxy_each_client_has_its_own_count(make_user, settings):
    settings.PANTHEON_TRUSTED_PROXY_COUNT = 1
    make_user("victim")
    for i in range(20):
        log_in(f"guess{i}", "wrong", ip="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.1")
    assert log_in("victim", "pw", ip="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.1").status_code == 429
    assert logged_in(log_in("victim", "pw", ip="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.2"))


def test_a_form_without_a_password_is_not_counted(alice):
    for _ in range(10):
        assert Client().post(LOGIN, {"username": "alice"}).status_code == 200
    assert not LoginAttempt.objects.exists()
    assert logged_in(log_in("alice", "pw"))


def test_the_admin_login_is_limited_too(db):
    get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    for _ in range(5):
        response = log_in("root", "wrong", path="/admin/login/")
        assert response.status_code == 200 and "errornote" in response.content.decode()
    refused = log_in("root", "pw", path="/admin/login/")
    page = refused.content.decode()
    assert "Too many failed login attempts for this username." in page
    assert "_auth_user_id" not in refused.client.session
    # The chat page's login shares the count.
    assert log_in("root", "pw").status_code == 429


def test_concurrent_attempts_get_at_most_the_limit_of_password_checks(transactional_db):
    results = in_threads(lambda i: login_limit.begin("target", f"198.51.100.{i}"), 30, workers=10)
    checked = [r for r in results if not isinstance(r, login_limit.Refused)]
    # Never more than the limit; at the edge, concurrent attempts may refuse each other.
    assert 1 <= len(checked) <= 5, results
    assert all(r.reason == "username" and r.retry_after > 0 for r in results if r not in checked)
    assert LoginAttempt.objects.filter(username="target").count() == len(checked)


def test_concurrent_attempts_from_one_address(transactional_db):
    results = in_threads(lambda i: login_limit.begin(f"user{i}", "198.51.100.1"), 40, workers=10)
    assert 1 <= sum(not isinstance(r, login_limit.Refused) for r in results) <= 20


def test_attempts_deleted_while_a_refusal_is_timed_still_refuse(transactional_db, monkeypatch):
    # The refusal's retry time reads the others in the window; concurrent attempts delete
    # theirs meanwhile. Counted and indexed in two reads, that was an IndexError (a 500).
    from django.db.models import QuerySet

    for _ in range(6):
        LoginAttempt.objects.create(username="target", ip="198.51.100.9", created_at=timezone.now())
    real_count = QuerySet.count

    def count_then_others_leave(queryset):
        counted = real_count(queryset)
        if tuple(queryset.query.order_by) == ("created_at",):  # the others, about to be indexed
            LoginAttempt.objects.filter(pk__in=list(LoginAttempt.objects.values_list("pk", flat=True)[:5])).delete()
        return counted

    monkeypatch.setattr(QuerySet, "count", count_then_others_leave)
    refused = login_limit.begin("target", "198.51.100.10")
    assert isinstance(refused, login_limit.Refused) and refused.reason == "username" and refused.retry_after > 0
