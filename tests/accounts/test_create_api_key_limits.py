"""`manage.py create_api_key USERNAME` with the limits of SPEC section 16: `--name --rpm --tpm
--max-parallel --budget --budget-period --models --expires-in-days`, validated as the model
validates them; the key stays the last line of stdout, a summary goes to stderr."""

import datetime
import io
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import ApiKey, hash_key


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_every_limit(alice):
    out, err = run("alice", "--name", "nightly", "--rpm", "5", "--tpm", "2000", "--max-parallel", "2",
                   "--budget", "1.25", "--budget-period", "week", "--models", "m/one, m/two,m/one",
                   "--expires-in-days", "3")
    raw = out.strip().splitlines()[-1]
    key = ApiKey.objects.get(key_hash=hash_key(raw))
    assert (key.user, key.name, key.rpm, key.tpm, key.max_parallel, key.budget, key.budget_period,
            key.allowed_models) == (alice, "nightly", 5, 2000, 2, Decimal("1.25"), "week", ["m/one", "m/two"])
    expected = timezone.now() + datetime.timedelta(days=3)
    assert abs(key.expires_at - expected) < datetime.timedelta(minutes=1)
    assert key.is_restricted
    # The summary is on stderr, never the key.
    assert raw not in err
    for text in ["rpm 5", "tpm 2000", "max parallel 2", "budget 1.25 per week", "models m/one, m/two", "expires",
                 key.prefix]:
        assert text in err, text


def test_no_limits_is_an_unrestricted_key(alice):
    out, err = run("alice")
    key = ApiKey.objects.get(key_hash=hash_key(out.strip().splitlines()[-1]))
    assert not key.is_restricted and key.budget_period == "" and key.allowed_models is None
    assert "no limits" in err


@pytest.mark.parametrize("args, message", [
    (["--rpm", "0"], "rpm"),
    (["--tpm", "-1"], "tpm"),
    (["--max-parallel", "0"], "max_parallel"),
    (["--budget", "-1", "--budget-period", "day"], "budget"),
    (["--budget", "1.0000001", "--budget-period", "day"], "budget"),
    (["--budget", "lots", "--budget-period", "day"], "not a number"),
    (["--budget", "NaN", "--budget-period", "day"], "not a number"),
    (["--budget", "1"], "budget period"),
    (["--budget-period", "day"], "budget period"),
    (["--models", " , "], "at least one model"),
    (["--expires-in-days", "0"], "at least 1"),
    (["--expires-in-days", "99999999999"], "too large"),
    (["--name", "x" * 101], "name"),
])
def test_invalid_limits_are_a_command_error_and_make_nothing(alice, args, message):
    with pytest.raises(CommandError, match=message):
        run("alice", *args)
    assert not ApiKey.objects.exists()


def test_a_bad_period_is_refused_by_the_parser(alice):
    with pytest.raises(CommandError, match="invalid choice"):
        run("alice", "--budget", "1", "--budget-period", "year")


def test_an_invalid_limit_does_not_create_the_user_either(db):
    with pytest.raises(CommandError):
        run("newbie", "--create-user", "--rpm", "0")
    assert not get_user_model().objects.filter(username="newbie").exists()
    out, err = run("newbie", "--create-user", "--rpm", "1")
    assert "Created user 'newbie'" in err
    assert ApiKey.objects.get(key_hash=hash_key(out.strip().splitlines()[-1])).user.username == "newbie"


def test_the_key_is_the_last_line_of_stdout(alice):
    out, _ = run("alice", "--budget", "2", "--budget-period", "total")
    lines = out.strip().splitlines()
    assert lines[-1].startswith("pk_") and ApiKey.objects.filter(key_hash=hash_key(lines[-1])).exists()
