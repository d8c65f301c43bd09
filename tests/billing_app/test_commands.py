import subprocess
import sys
from decimal import Decimal
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from accounts.models import ApiKey, hash_key
from billing_app.models import LedgerEntry, ModelPrice, Wallet
from tests.conftest import subprocess_env


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_create_api_key_prints_a_working_key_last(alice):
    key = run("create_api_key", "alice").strip().splitlines()[-1]
    assert ApiKey.objects.get(key_hash=hash_key(key)).user == alice


def test_create_api_key_unknown_user(db):
    with pytest.raises(CommandError, match="No user named 'ghost'"):
        run("create_api_key", "ghost")


def test_create_api_key_can_create_the_user(db):
    key = run("create_api_key", "newbie", "--create-user").strip().splitlines()[-1]
    assert ApiKey.objects.get(key_hash=hash_key(key)).user.username == "newbie"


def test_grant_credits(alice):
    run("grant_credits", "alice", "2.5", "--note", "bonus")
    entry = LedgerEntry.objects.filter(user=alice).latest("created_at")
    assert (entry.amount, entry.note, entry.balance_after) == (Decimal("2.5"), "bonus", Decimal("12.5"))


@pytest.mark.parametrize("amount", ["abc", "-3", "0", "1.0000001"])
def test_grant_credits_bad_amount(alice, amount):
    with pytest.raises(CommandError):
        run("grant_credits", "alice", amount)
    assert Wallet.objects.get(user=alice).balance == Decimal("10")


def test_grant_credits_unknown_user(db):
    with pytest.raises(CommandError, match="No user named"):
        run("grant_credits", "ghost", "1")


def test_set_price_creates_and_updates(db):
    run("set_price", "a/b", "0.15", "0.6")
    run("set_price", "a/b", "0.2", "0.8")
    price = ModelPrice.objects.get(model="a/b")
    assert (price.prompt_price_per_mtok, price.completion_price_per_mtok) == (Decimal("0.2"), Decimal("0.8"))


@pytest.mark.parametrize("prices", [("x", "1"), ("-1", "1"), ("1", "NaN")])
def test_set_price_rejects_bad_prices(db, prices):
    with pytest.raises(CommandError):
        run("set_price", "a/b", *prices)
    assert not ModelPrice.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_commands_as_real_subprocesses():
    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)

    created = manage("create_api_key", "zoe", "--create-user")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    user = get_user_model().objects.get(username="zoe")
    assert ApiKey.objects.get(key_hash=hash_key(key)).user == user

    assert manage("grant_credits", "zoe", "3", "--note", "hello").returncode == 0
    assert Wallet.objects.get(user=user).balance == Decimal("3")
    assert manage("set_price", "m/x", "1", "2").returncode == 0
    assert ModelPrice.objects.filter(model="m/x").exists()

    failed = manage("grant_credits", "ghost", "1")
    assert failed.returncode != 0 and "No user named 'ghost'" in failed.stderr
