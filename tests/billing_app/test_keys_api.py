"""The keys users make themselves (SPEC section 16): GET/POST /api/v1/keys, PATCH/DELETE
/api/v1/keys/{id}, and GET /api/v1/usage?key=."""

import datetime
import uuid
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.authentication import ApiKeyAuthentication
from accounts.models import ApiKey, hash_key
from billing_app.models import UsageRecord
from billing_app.selectors import period_start
from tests.conftest import MODEL

FIELDS = {"id", "name", "prefix", "created_at", "last_used_at", "expires_at", "rpm", "tpm", "max_parallel",
          "budget", "budget_period", "models", "spent_this_period"}


def bearer(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def key_of(client: APIClient) -> ApiKey:
    return ApiKey.objects.get(key_hash=hash_key(client.raw_key))


def usage(user, key: ApiKey | None, cost: str, at: datetime.datetime | None = None) -> UsageRecord:
    return UsageRecord.objects.create(
        user=user, session_id=uuid.uuid4(), turn_id=uuid.uuid4(), api_key_id=key.pk if key else None, model=MODEL,
        prompt_tokens=1, completion_tokens=1, total_tokens=2, cost=Decimal(cost), created_at=at or timezone.now())


# --- create, shown once ------------------------------------------------------------------

def test_create_shows_the_key_once_and_only_in_that_answer(alice, alice_api, price):
    response = alice_api.post("/api/v1/keys", {
        "name": "script", "rpm": 5, "tpm": 1000, "max_parallel": 2, "budget": "1.5", "budget_period": "week",
        "models": [MODEL], "expires_in_days": 7}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == FIELDS | {"key"}
    raw = body["key"]
    assert raw.startswith("pk_") and body["prefix"] == raw[:10]
    assert "no-store" in response["Cache-Control"]
    assert (body["name"], body["rpm"], body["tpm"], body["max_parallel"], body["budget"], body["budget_period"],
            body["models"], body["spent_this_period"]) == ("script", 5, 1000, 2, "1.500000", "week", [MODEL],
                                                           "0.000000")
    expires = datetime.datetime.fromisoformat(body["expires_at"])
    assert abs(expires - (timezone.now() + datetime.timedelta(days=7))) < datetime.timedelta(minutes=1)
    key = ApiKey.objects.get(pk=body["id"])
    assert key.user == alice and key.key_hash == hash_key(raw) and key.allowed_models == [MODEL]
    assert key.budget == Decimal("1.5") and key.is_restricted
    # The new key works (a restricted key may do everything but manage keys).
    assert bearer(raw).get("/api/v1/wallet").status_code == 200
    # ... and is never shown again, nor its hash.
    listing = alice_api.get("/api/v1/keys")
    text = listing.content.decode()
    assert raw not in text and key.key_hash not in text and '"key"' not in text
    for item in listing.json()["results"]:
        assert set(item) == FIELDS


def test_create_with_nothing_makes_an_unrestricted_key(alice, alice_api):
    response = alice_api.post("/api/v1/keys", {}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert {name: body[name] for name in ("name", "rpm", "tpm", "max_parallel", "budget", "budget_period",
                                          "models", "expires_at", "last_used_at")} == {
        "name": "", "rpm": None, "tpm": None, "max_parallel": None, "budget": None, "budget_period": None,
        "models": None, "expires_at": None, "last_used_at": None}
    assert not ApiKey.objects.get(pk=body["id"]).is_restricted
    # An unrestricted key may itself manage keys.
    assert bearer(body["key"]).get("/api/v1/keys").status_code == 200


def test_create_with_expires_at(alice_api):
    when = timezone.now() + datetime.timedelta(hours=3)
    body = alice_api.post("/api/v1/keys", {"expires_at": when.isoformat()}, format="json").json()
    assert datetime.datetime.fromisoformat(body["expires_at"]) == when


# --- list --------------------------------------------------------------------------------

def test_list_is_own_unrevoked_keys_newest_first(alice, alice_api, bob_api):
    first = alice_api.post("/api/v1/keys", {"name": "first"}, format="json").json()
    second = alice_api.post("/api/v1/keys", {"name": "second"}, format="json").json()
    revoked = alice_api.post("/api/v1/keys", {"name": "revoked"}, format="json").json()
    ApiKey.objects.filter(pk=revoked["id"]).update(revoked_at=timezone.now())
    expired = ApiKey.issue(user=alice, name="expired")[0]
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - datetime.timedelta(seconds=1))
    page = alice_api.get("/api/v1/keys").json()
    assert set(page) == {"count", "next", "previous", "results"}
    names = [item["name"] for item in page["results"]]
    # Expired keys are listed (they can be extended); revoked ones and bob's are not.
    assert names == ["expired", "second", "first", ""]  # "": the key the client itself uses
    assert page["results"][1]["id"] == second["id"] and page["results"][2]["id"] == first["id"]
    assert [item["name"] for item in bob_api.get("/api/v1/keys").json()["results"]] == [""]


def test_list_takes_a_constant_number_of_queries(alice, alice_api, django_assert_max_num_queries, price):
    for i, period in enumerate(["day", "week", "month", "total", None]):
        key = ApiKey.issue(user=alice, name=f"k{i}")[0]
        if period:
            ApiKey.objects.filter(pk=key.pk).update(budget=Decimal(1), budget_period=period)
        usage(alice, key, "0.1")
    with django_assert_max_num_queries(4):  # the key, its last use, the count, the page
        page = alice_api.get("/api/v1/keys").json()
    assert page["count"] == 6
    assert {item["name"]: item["spent_this_period"] for item in page["results"]} == {
        "k0": "0.100000", "k1": "0.100000", "k2": "0.100000", "k3": "0.100000", "k4": "0.100000", "": "0.000000"}


# --- spent_this_period ---------------------------------------------------------------------

@pytest.mark.parametrize("period", ["day", "week", "month", "total", None])
def test_spent_this_period_counts_the_key_usage_in_its_period(alice, bob, alice_api, period):
    key = ApiKey.issue(user=alice, name="counted")[0]
    if period:
        ApiKey.objects.filter(pk=key.pk).update(budget=Decimal(5), budget_period=period)
    other = ApiKey.issue(user=alice)[0]
    now = timezone.now()
    start = period_start(period or "", now)
    usage(alice, key, "0.25", at=start)  # from the very start of the period
    usage(alice, key, "0.000001")
    usage(alice, key, "7", at=(start or now - datetime.timedelta(days=4000)) - datetime.timedelta(microseconds=1))
    usage(alice, other, "3")  # another key's
    usage(alice, None, "3")  # the browser session's
    expected = "7.250001" if period == "total" else "0.250001"
    listed = {item["id"]: item for item in alice_api.get("/api/v1/keys").json()["results"]}
    assert listed[str(key.pk)]["spent_this_period"] == expected
    assert listed[str(other.pk)]["spent_this_period"] == "3.000000"
    patched = alice_api.patch(f"/api/v1/keys/{key.pk}", {"name": "renamed"}, format="json").json()
    assert patched["spent_this_period"] == expected


# --- patch ---------------------------------------------------------------------------------

def test_patch_sets_and_clears_limits(alice, alice_api, price):
    key = alice_api.post("/api/v1/keys", {"name": "script"}, format="json").json()
    url = f"/api/v1/keys/{key['id']}"
    when = timezone.now() + datetime.timedelta(days=2)
    response = alice_api.patch(url, {"rpm": 3, "tpm": 500, "max_parallel": 1, "budget": "0.000001",
                                     "budget_period": "total", "models": [MODEL, MODEL],
                                     "expires_at": when.isoformat()}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == FIELDS
    assert (body["name"], body["rpm"], body["tpm"], body["max_parallel"], body["budget"], body["budget_period"],
            body["models"]) == ("script", 3, 500, 1, "0.000001", "total", [MODEL])
    row = ApiKey.objects.get(pk=key["id"])
    assert (row.rpm, row.budget, row.budget_period, row.allowed_models, row.expires_at) == (
        3, Decimal("0.000001"), "total", [MODEL], when)
    # Left out: unchanged; null: cleared.
    body = alice_api.patch(url, {"rpm": None, "models": None, "expires_at": None}, format="json").json()
    assert (body["rpm"], body["tpm"], body["models"], body["expires_at"], body["budget"]) == (
        None, 500, None, None, "0.000001")
    body = alice_api.patch(url, {"budget": None, "budget_period": None, "tpm": None, "max_parallel": None,
                                 "name": ""}, format="json").json()
    assert (body["budget"], body["budget_period"], body["tpm"], body["max_parallel"], body["name"]) == (
        None, None, None, None, "")
    row.refresh_from_db()
    assert not row.is_restricted and row.budget_period == ""
    assert alice_api.patch(url, {}, format="json").status_code == 200


def test_patch_budget_and_period_come_together(alice, alice_api):
    key = alice_api.post("/api/v1/keys", {"budget": "2", "budget_period": "day"}, format="json").json()
    url = f"/api/v1/keys/{key['id']}"
    for body in [{"budget": "3"}, {"budget_period": "week"}, {"budget": "3", "budget_period": None},
                 {"budget": None, "budget_period": "week"}]:
        response = alice_api.patch(url, body, format="json")
        assert response.status_code == 400, body
        assert response.json()["code"] == "invalid_budget", body
    assert alice_api.patch(url, {"budget": "3", "budget_period": "month"}, format="json").json()["budget"] == \
        "3.000000"
    # Null in either clears the budget (and its period).
    body = alice_api.patch(url, {"budget": None}, format="json").json()
    assert (body["budget"], body["budget_period"]) == (None, None)
    row = ApiKey.objects.get(pk=key["id"])
    assert (row.budget, row.budget_period) == (None, "")
    row.full_clean()


def test_patch_can_extend_an_expired_key(alice, alice_api):
    key, raw = ApiKey.issue(user=alice)
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - datetime.timedelta(seconds=1))
    assert bearer(raw).get("/api/v1/wallet").status_code == 401
    when = timezone.now() + datetime.timedelta(days=1)
    assert alice_api.patch(f"/api/v1/keys/{key.pk}", {"expires_at": when.isoformat()},
                           format="json").status_code == 200
    assert bearer(raw).get("/api/v1/wallet").status_code == 200


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    ({"rpm": 0}, "invalid_min_value"),
    ({"tpm": -5}, "invalid_min_value"),
    ({"max_parallel": 2**31}, "invalid_max_value"),
    ({"rpm": "many"}, "invalid"),
    ({"rpm": 1.5}, "invalid"),
    ({"rpm": True}, "invalid"),
    ({"budget": "-1", "budget_period": "day"}, "invalid_min_value"),
    ({"budget": "1.0000001", "budget_period": "day"}, "max_decimal_places"),
    ({"budget": "NaN", "budget_period": "day"}, "invalid"),
    ({"budget": "1e30", "budget_period": "day"}, "max_digits"),
    ({"budget": "1"}, "invalid_budget"),
    ({"budget_period": "day"}, "invalid_budget"),
    ({"budget": "1", "budget_period": "year"}, "invalid_budget_period"),
    ({"budget": "1", "budget_period": ""}, "invalid_budget_period"),
    ({"models": []}, "invalid_min_length"),
    ({"models": [""]}, "invalid_blank"),
    ({"models": "test/model"}, "not_a_list"),
    ({"models": [MODEL, "no/such-model"]}, "unknown_model"),
    ({"expires_at": "2020-01-01T00:00:00Z"}, "invalid_expires_at"),
    ({"expires_at": "tomorrow"}, "invalid"),
    ({"expires_in_days": 0}, "invalid_min_value"),
    ({"expires_in_days": 1, "expires_at": "2999-01-01T00:00:00Z"}, "invalid_expires_at"),
    ({"name": "x" * 101}, "invalid_max_length"),
    ({"name": None}, "invalid_null"),
    ({"name": "a\x00b"}, "invalid_text"),
])
def test_invalid_bodies_are_400_with_a_code(alice, alice_api, price, body, code):
    before = ApiKey.objects.count()
    created = alice_api.post("/api/v1/keys", body, format="json")
    assert created.status_code == 400, created.content
    assert created.json()["code"] == code and created.json()["detail"]
    assert ApiKey.objects.count() == before  # nothing made
    key = ApiKey.issue(user=alice, name="kept")[0]
    patched = alice_api.patch(f"/api/v1/keys/{key.pk}", body, format="json")
    assert patched.status_code == 400 and patched.json()["code"] == code
    key.refresh_from_db()
    assert key.name == "kept" and not key.is_restricted


def test_a_body_that_is_not_json_is_refused(alice_api):
    assert alice_api.post("/api/v1/keys", "{not json", content_type="application/json").json()["code"] == \
        "parse_error"  # as on every DRF endpoint
    assert alice_api.post("/api/v1/keys", [], format="json").json()["code"] == "invalid"
    assert alice_api.post("/api/v1/keys", {"name": "x"}, format="multipart").status_code == 415


# --- revoke ----------------------------------------------------------------------------------

def test_revoke_stops_the_key_at_once(alice, alice_api, price):
    made = alice_api.post("/api/v1/keys", {"name": "doomed"}, format="json").json()
    doomed = bearer(made["key"])
    assert doomed.get("/api/v1/sessions").status_code == 200
    assert doomed.get("/v1/models").status_code == 200
    response = alice_api.delete(f"/api/v1/keys/{made['id']}")
    assert response.status_code == 204 and not response.content
    assert ApiKey.objects.get(pk=made["id"]).revoked_at is not None
    assert doomed.get("/api/v1/sessions").status_code == 401
    assert doomed.get("/v1/models").status_code == 401
    assert made["id"] not in alice_api.get("/api/v1/keys").content.decode()
    # Gone for the API: a second revoke, or a patch, is a 404.
    assert alice_api.delete(f"/api/v1/keys/{made['id']}").status_code == 404
    assert alice_api.patch(f"/api/v1/keys/{made['id']}", {"name": "back"}, format="json").status_code == 404


def test_a_key_may_revoke_itself(alice_api):
    own = key_of(alice_api)
    assert alice_api.delete(f"/api/v1/keys/{own.pk}").status_code == 204
    assert alice_api.get("/api/v1/keys").status_code == 401


# --- restricted keys, other users -------------------------------------------------------------

RESTRICTIONS = [
    {"rpm": 5}, {"tpm": 100}, {"max_parallel": 1}, {"budget": Decimal("1"), "budget_period": "day"},
    {"budget": Decimal("0"), "budget_period": "total"}, {"allowed_models": [MODEL]},
    {"expires_at": "future"},
]


@pytest.mark.parametrize("limits", RESTRICTIONS, ids=lambda limits: "-".join(limits))
def test_a_restricted_key_cannot_manage_keys(alice, price, limits):
    if limits.get("expires_at") == "future":
        limits = {"expires_at": timezone.now() + datetime.timedelta(days=1)}
    key, raw = ApiKey.issue(user=alice, name="restricted")
    ApiKey.objects.filter(pk=key.pk).update(**limits)
    other = ApiKey.issue(user=alice, name="other")[0]
    client = bearer(raw)
    assert client.get("/api/v1/wallet").status_code == 200  # it works, elsewhere
    before = ApiKey.objects.count()
    for response in [client.get("/api/v1/keys"),
                     client.post("/api/v1/keys", {"name": "escape"}, format="json"),
                     client.patch(f"/api/v1/keys/{key.pk}", {"rpm": None, "tpm": None, "max_parallel": None,
                                                              "budget": None, "models": None, "expires_at": None},
                                  format="json"),
                     client.patch(f"/api/v1/keys/{other.pk}", {"name": "x"}, format="json"),
                     client.delete(f"/api/v1/keys/{other.pk}"),
                     client.delete(f"/api/v1/keys/{uuid.uuid4()}")]:
        assert response.status_code == 403, response.content
        assert response.json()["code"] == "restricted_key"
    assert ApiKey.objects.count() == before
    key.refresh_from_db()
    other.refresh_from_db()
    assert key.is_restricted and other.name == "other" and other.revoked_at is None


def test_another_users_key_is_a_404(alice, alice_api, bob):
    bobs = ApiKey.issue(user=bob, name="bob's")[0]
    for response in [alice_api.patch(f"/api/v1/keys/{bobs.pk}", {"name": "mine"}, format="json"),
                     alice_api.delete(f"/api/v1/keys/{bobs.pk}"),
                     alice_api.delete(f"/api/v1/keys/{uuid.uuid4()}")]:
        assert response.status_code == 404
        assert response.json() == {"detail": "Not found.", "code": "not_found"}
    bobs.refresh_from_db()
    assert bobs.name == "bob's" and bobs.revoked_at is None
    assert str(bobs.pk) not in alice_api.get("/api/v1/keys").content.decode()


def test_no_credentials_or_a_bad_key_is_401(db):
    assert APIClient().get("/api/v1/keys").status_code == 401
    response = bearer("pk_nope").post("/api/v1/keys", {}, format="json")
    assert response.status_code == 401 and response.json()["code"] == "authentication_failed"


def test_an_expired_key_is_a_401(alice):
    key, raw = ApiKey.issue(user=alice)
    client = bearer(raw)
    assert client.get("/api/v1/sessions").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - datetime.timedelta(seconds=1))
    for path in ["/api/v1/sessions", "/api/v1/keys", "/api/v1/wallet"]:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["code"] == "authentication_failed"
        assert response["WWW-Authenticate"].startswith("Bearer")


def test_the_authenticated_request_carries_its_key(alice, rf):
    key, raw = ApiKey.issue(user=alice)
    request = rf.get("/api/v1/keys", HTTP_AUTHORIZATION=f"Bearer {raw}")
    user, auth = ApiKeyAuthentication().authenticate(request)
    assert user == alice and auth == key and auth.user == alice and auth.last_used_at is not None
    assert ApiKeyAuthentication().authenticate(rf.get("/api/v1/keys")) is None  # no Bearer: the session's turn


# --- the browser session ---------------------------------------------------------------------

def test_the_browser_session_manages_keys_with_csrf(alice):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get("/api/v1/keys").status_code == 200  # reads need no token
    refused = client.post("/api/v1/keys", {"name": "from the page"}, format="json")
    assert refused.status_code == 403
    assert not ApiKey.objects.filter(user=alice).exists()
    token = client.get("/").cookies["csrftoken"].value  # the chat page sets it
    made = client.post("/api/v1/keys", {"name": "from the page", "budget": "2", "budget_period": "day"},
                       format="json", HTTP_X_CSRFTOKEN=token)
    assert made.status_code == 201 and made.json()["key"].startswith("pk_")
    url = f"/api/v1/keys/{made.json()['id']}"
    assert client.patch(url, {"name": "renamed"}, format="json").status_code == 403
    assert client.delete(url).status_code == 403
    assert client.patch(url, {"name": "renamed"}, format="json", HTTP_X_CSRFTOKEN=token).json()["name"] == "renamed"
    assert client.delete(url, HTTP_X_CSRFTOKEN=token).status_code == 204


# --- GET /api/v1/usage?key= ------------------------------------------------------------------

def test_usage_filtered_by_key(alice, alice_api, bob):
    mine, other = ApiKey.issue(user=alice)[0], ApiKey.issue(user=alice)[0]
    first, second = usage(alice, mine, "0.1"), usage(alice, mine, "0.2")
    usage(alice, other, "0.3")
    usage(alice, None, "0.4")
    page = alice_api.get(f"/api/v1/usage?key={mine.pk}").json()
    assert page["count"] == 2
    assert [item["id"] for item in page["results"]] == [str(second.pk), str(first.pk)]
    assert {item["key_id"] for item in page["results"]} == {str(mine.pk)}
    everything = alice_api.get("/api/v1/usage").json()
    assert everything["count"] == 4 and None in {item["key_id"] for item in everything["results"]}
    # A revoked key's usage stays readable.
    mine.revoke()
    assert alice_api.get(f"/api/v1/usage?key={mine.pk}").json()["count"] == 2


def test_usage_of_someone_elses_or_no_key(alice_api, bob):
    bobs = ApiKey.issue(user=bob)[0]
    usage(bob, bobs, "1")
    for key_id in [bobs.pk, uuid.uuid4()]:
        response = alice_api.get(f"/api/v1/usage?key={key_id}")
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
    bad = alice_api.get("/api/v1/usage?key=not-a-uuid")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_key"
