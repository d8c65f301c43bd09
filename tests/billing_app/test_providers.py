"""Providers and routes from the operator's side (SPEC sections 9 and 15): add_provider,
set_price's route options, and their admin pages."""

from decimal import Decimal
from io import StringIO

import pytest
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from billing_app import services
from billing_app.models import ModelPrice, Provider, UsageRecord
from sessions_app.admin import TurnInline
from sessions_app.models import LlmEvent, Turn

SECRET = "sk-very-secret-0123456789"


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def priced(*models: str) -> None:
    for model in models:
        services.set_price(model=model, prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"))


@pytest.fixture
def local(db) -> Provider:
    return Provider.objects.create(name="local", base_url="http://127.0.0.1:8000/v1", api_key=SECRET)


# add_provider

def test_add_provider_creates_a_row(db):
    out = run("add_provider", "local", "http://127.0.0.1:8000/v1", "--api-key-env", "LOCAL_KEY", "--timeout", "30")
    provider = Provider.objects.get(name="local")
    assert (provider.base_url, provider.api_key_env, provider.api_key, provider.timeout_seconds) == (
        "http://127.0.0.1:8000/v1", "LOCAL_KEY", "", 30.0)
    assert out.strip() == "Created provider local: http://127.0.0.1:8000/v1, key from $LOCAL_KEY, timeout 30s."


def test_add_provider_updates_the_row_of_that_name(db):
    run("add_provider", "local", "http://127.0.0.1:8000/v1", "--api-key", SECRET, "--timeout", "5")
    out = run("add_provider", "local", "http://10.0.0.2:8080/v1", "--api-key-env", "LOCAL_KEY")
    assert out.startswith("Updated provider local:") and "key from $LOCAL_KEY" in out
    provider = Provider.objects.get()
    # The new key source replaces the stored key; the timeout not given is kept.
    assert (provider.base_url, provider.api_key_env, provider.api_key, provider.timeout_seconds) == (
        "http://10.0.0.2:8080/v1", "LOCAL_KEY", "", 5.0)


def test_add_provider_keeps_the_key_when_no_key_option_is_given(local):
    out = run("add_provider", "local", "http://127.0.0.1:9000/v1")
    local.refresh_from_db()
    assert local.api_key == SECRET and local.base_url == "http://127.0.0.1:9000/v1"
    assert "key stored" in out and SECRET not in out


def test_add_provider_can_drop_the_key(local):
    out = run("add_provider", "local", "http://127.0.0.1:8000/v1", "--api-key", "")
    local.refresh_from_db()
    assert (local.api_key, local.api_key_env) == ("", "") and "no key" in out


def test_add_provider_never_prints_the_key(db):
    out, err = StringIO(), StringIO()
    call_command("add_provider", "local", "http://127.0.0.1:8000/v1", "--api-key", SECRET, stdout=out, stderr=err)
    assert "key stored" in out.getvalue()
    assert SECRET not in out.getvalue() + err.getvalue()
    with pytest.raises(CommandError) as refused:
        run("add_provider", "local", "not a url", "--api-key", SECRET)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("name", ["openrouter", "fake"])
def test_add_provider_refuses_a_reserved_name(db, name):
    with pytest.raises(CommandError, match="the provider the settings configure"):
        run("add_provider", name, "http://127.0.0.1:8000/v1")
    assert not Provider.objects.exists()


@pytest.mark.parametrize("args, match", [
    (["local", "not a url"], "base_url: Enter a valid URL"),
    (["Local", "http://127.0.0.1:8000/v1"], "name: A provider name is lower-case"),
    (["local", "http://127.0.0.1:8000/v1", "--api-key-env", "1-BAD"], "api_key_env: An environment variable name"),
    (["local", "http://127.0.0.1:8000/v1", "--timeout", "0"], "timeout_seconds"),
    (["local", "http://127.0.0.1:8000/v1", "--timeout", "nan"], "finite"),
    (["local", "http://127.0.0.1:8000/v1", "--timeout", "soon"], "invalid float value"),
])
def test_add_provider_refuses_bad_values_with_a_message(db, args, match):
    with pytest.raises(CommandError, match=match):
        run("add_provider", *args)
    assert not Provider.objects.exists()


def test_add_provider_takes_one_key_option_only(db):
    with pytest.raises(CommandError, match="not allowed with"):
        run("add_provider", "local", "http://127.0.0.1:8000/v1", "--api-key-env", "LOCAL_KEY", "--api-key", SECRET)
    # Options given as keywords skip argparse's check; the model's own rule still holds.
    with pytest.raises(CommandError, match="not both"):
        call_command("add_provider", "local", "http://127.0.0.1:8000/v1", api_key_env="LOCAL_KEY", api_key=SECRET,
                     stdout=StringIO())
    assert not Provider.objects.exists()


# set_price's route options

def test_set_price_with_a_route(local):
    priced("m2", "m3")
    out = run("set_price", "m1", "1", "2", "--provider", "local", "--upstream-model", "llama-3-8b",
              "--fallbacks", "m2, m3")
    price = ModelPrice.objects.get(model="m1")
    assert (price.provider, price.upstream_model, price.fallbacks) == (local, "llama-3-8b", ["m2", "m3"])
    assert "provider local" in out and "upstream model llama-3-8b" in out and "fallbacks m2, m3" in out


def test_set_price_keeps_the_route_options_not_given(local):
    priced("m2")
    run("set_price", "m1", "1", "2", "--provider", "local", "--upstream-model", "up", "--fallbacks", "m2")
    run("set_price", "m1", "3", "4")
    price = ModelPrice.objects.get(model="m1")
    assert (price.prompt_price_per_mtok, price.completion_price_per_mtok) == (Decimal("3"), Decimal("4"))
    assert (price.provider, price.upstream_model, price.fallbacks) == (local, "up", ["m2"])


def test_set_price_clears_fallbacks_and_upstream_model(local):
    priced("m2")
    run("set_price", "m1", "1", "2", "--provider", "local", "--upstream-model", "up", "--fallbacks", "m2")
    out = run("set_price", "m1", "1", "2", "--fallbacks", "", "--upstream-model", "")
    price = ModelPrice.objects.get(model="m1")
    assert (price.provider, price.upstream_model, price.fallbacks) == (local, "", [])
    assert "fallbacks" not in out and "upstream model" not in out


@pytest.mark.parametrize("name", ["default", "openrouter", "fake"])
def test_set_price_configured_provider_names_mean_no_provider(local, name):
    run("set_price", "m1", "1", "2", "--provider", "local")
    out = run("set_price", "m1", "1", "2", "--provider", name)
    assert ModelPrice.objects.get(model="m1").provider is None
    assert "provider" not in out


def test_set_price_unknown_provider_lists_the_known_ones(local):
    with pytest.raises(CommandError, match=r"No provider 'ghost'\. Known: default, openrouter or fake .*, local\."):
        run("set_price", "m1", "1", "2", "--provider", "ghost")
    assert not ModelPrice.objects.exists()


def test_set_price_refuses_an_unpriced_fallback(db):
    priced("m1", "m2")
    with pytest.raises(CommandError, match="fallbacks: Not in the catalogue: ghost"):
        run("set_price", "m1", "5", "5", "--fallbacks", "m2,ghost")
    price = ModelPrice.objects.get(model="m1")
    assert price.fallbacks == [] and price.prompt_price_per_mtok == Decimal("1")  # nothing changed


@pytest.mark.parametrize("fallbacks", ["m1", "m2,m2"])
def test_set_price_refuses_a_self_or_repeated_fallback(db, fallbacks):
    priced("m2")
    with pytest.raises(CommandError, match="cannot fall back to itself"):
        run("set_price", "m1", "1", "2", "--fallbacks", fallbacks)
    assert not ModelPrice.objects.filter(model="m1").exists()


def test_set_price_refuses_an_upstream_model_too_long(db):
    with pytest.raises(CommandError, match="upstream_model"):
        run("set_price", "m1", "1", "2", "--upstream-model", "x" * 201)


def test_a_price_only_update_ignores_a_stale_fallback(db):
    priced("m2")
    run("set_price", "m1", "1", "2", "--fallbacks", "m2")
    ModelPrice.objects.filter(model="m2").delete()
    run("set_price", "m1", "3", "4")  # still works, as it did before routes existed
    assert ModelPrice.objects.get(model="m1").prompt_price_per_mtok == Decimal("3")


def test_the_service_takes_a_provider_row_or_none(local):
    price = services.set_price(model="m1", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"),
                               provider=local)
    assert price.provider == local
    price = services.set_price(model="m1", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"),
                               provider=None)
    assert ModelPrice.objects.get(pk=price.pk).provider is None
    with pytest.raises(ValidationError):
        services.set_price(model="m1", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"),
                           fallbacks=["m1"])


# Admin

@pytest.mark.parametrize("path", [
    "billing_app/provider/", "billing_app/provider/add/", "billing_app/modelprice/", "billing_app/modelprice/add/",
])
def test_provider_and_price_pages_render(admin_client, local, path):
    priced("m2")
    services.set_price(model="m1", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"),
                       provider=local, fallbacks=["m2"])
    assert admin_client.get(f"/admin/{path}").status_code == 200


def test_change_forms_render(admin_client, local):
    priced("m2")
    price = services.set_price(model="m1", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"),
                               provider=local, fallbacks=["m2"])
    assert admin_client.get(f"/admin/billing_app/provider/{local.pk}/change/").status_code == 200
    page = admin_client.get(f"/admin/billing_app/modelprice/{price.pk}/change/")
    assert page.status_code == 200
    assert 'value="m2"' in page.content.decode()  # the list as text, not JSON


def test_provider_pages_never_show_the_stored_key(admin_client, local):
    Provider.objects.create(name="env-one", base_url="http://127.0.0.1:9000/v1", api_key_env="ENV_ONE_KEY")
    listing = admin_client.get("/admin/billing_app/provider/").content.decode()
    assert SECRET not in listing and "stored" in listing and "env $ENV_ONE_KEY" in listing
    page = admin_client.get(f"/admin/billing_app/provider/{local.pk}/change/").content.decode()
    assert SECRET not in page and 'type="password"' in page


def _provider_form(provider: Provider, **changes) -> dict:
    return {"name": provider.name, "base_url": provider.base_url, "api_key_env": provider.api_key_env,
            "api_key": "", "timeout_seconds": provider.timeout_seconds or "", **changes}


def test_provider_admin_keeps_the_key_left_blank(admin_client, local):
    response = admin_client.post(f"/admin/billing_app/provider/{local.pk}/change/",
                                 _provider_form(local, base_url="http://127.0.0.1:8001/v1", timeout_seconds="12"))
    assert response.status_code == 302
    local.refresh_from_db()
    assert (local.api_key, local.base_url, local.timeout_seconds) == (SECRET, "http://127.0.0.1:8001/v1", 12.0)


def test_provider_admin_replaces_or_removes_the_key(admin_client, local):
    url = f"/admin/billing_app/provider/{local.pk}/change/"
    assert admin_client.post(url, _provider_form(local, api_key="sk-new")).status_code == 302
    local.refresh_from_db()
    assert local.api_key == "sk-new"
    assert admin_client.post(url, _provider_form(local, clear_api_key="on")).status_code == 302
    local.refresh_from_db()
    assert local.api_key == ""
    assert admin_client.post(url, _provider_form(local, api_key="sk-again")).status_code == 302
    # An environment variable replaces the stored key.
    assert admin_client.post(url, _provider_form(local, api_key_env="LOCAL_KEY")).status_code == 302
    local.refresh_from_db()
    assert (local.api_key, local.api_key_env) == ("", "LOCAL_KEY")


def test_provider_admin_refuses_a_reserved_name_and_both_keys(admin_client, db):
    response = admin_client.post("/admin/billing_app/provider/add/", {
        "name": "openrouter", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "", "api_key": ""})
    assert response.status_code == 200 and "the provider the settings configure" in response.content.decode()
    response = admin_client.post("/admin/billing_app/provider/add/", {
        "name": "local", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "LOCAL_KEY", "api_key": SECRET})
    page = response.content.decode()
    assert response.status_code == 200 and "not both" in page and SECRET not in page
    assert not Provider.objects.exists()


def _price_form(**changes) -> dict:
    return {"model": "m1", "prompt_price_per_mtok": "1", "completion_price_per_mtok": "2", "provider": "",
            "upstream_model": "", "fallbacks": "", **changes}


def test_model_price_admin_saves_comma_separated_fallbacks(admin_client, local):
    priced("a", "b")
    response = admin_client.post("/admin/billing_app/modelprice/add/",
                                 _price_form(fallbacks="a, b", provider=local.pk, upstream_model="up"))
    assert response.status_code == 302
    price = ModelPrice.objects.get(model="m1")
    assert (price.fallbacks, price.provider, price.upstream_model) == (["a", "b"], local, "up")
    listing = admin_client.get("/admin/billing_app/modelprice/").content.decode()
    assert "a, b" in listing and "(configured)" in listing  # a and b use the configured provider
    response = admin_client.post(f"/admin/billing_app/modelprice/{price.pk}/change/", _price_form(fallbacks=""))
    assert response.status_code == 302
    price.refresh_from_db()
    assert (price.fallbacks, price.provider) == ([], None)


@pytest.mark.parametrize("fallbacks, message", [("a, ghost", "Not in the catalogue: ghost"),
                                                ("m1", "cannot fall back to itself")])
def test_model_price_admin_refuses_bad_fallbacks(admin_client, db, fallbacks, message):
    priced("a")
    response = admin_client.post("/admin/billing_app/modelprice/add/", _price_form(fallbacks=fallbacks))
    assert response.status_code == 200 and message in response.content.decode()
    assert not ModelPrice.objects.filter(model="m1").exists()


def test_served_model_and_upstream_are_shown(admin_client):
    usage = admin.site._registry[UsageRecord]
    assert "served_model" in usage.list_display and "served_model" in usage.list_filter
    assert "served_model" in admin.site._registry[Turn].list_display and "served_model" in TurnInline.fields
    events = admin.site._registry[LlmEvent]
    assert {"model", "upstream"} <= set(events.list_display)
    for path in ("billing_app/usagerecord", "sessions_app/turn", "sessions_app/llmevent"):
        assert admin_client.get(f"/admin/{path}/").status_code == 200
