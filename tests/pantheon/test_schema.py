"""The schemas: the rules the database itself keeps, and the OpenAPI schema of the API
(/api/schema/, its docs page /api/docs/, and the JSON 404s and 405s under /api/)."""

import json
import re
import uuid
from decimal import Decimal
from html.parser import HTMLParser

import httpx
import pytest
import yaml
from django.apps import apps
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.test import Client
from drf_spectacular.drainage import GENERATOR_STATS

from billing_app.models import LedgerEntry, Wallet
from pantheon import api_urls

OWNED = [
    "accounts.ApiKey", "billing_app.Wallet", "billing_app.LedgerEntry", "billing_app.CreditHold",
    "billing_app.UsageRecord", "sessions_app.ChatSession", "sessions_app.Turn", "sessions_app.Message",
    "sessions_app.LlmEvent", "files_app.UploadedFile",
]


@pytest.mark.django_db
@pytest.mark.parametrize("label", OWNED)
def test_every_owned_table_is_indexed_on_its_user(label):
    model = apps.get_model(label)
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    # (An expression index, such as the search's GIN indexes, has no columns.)
    leading = [c["columns"][0] for c in constraints.values() if (c["index"] or c["unique"]) and c["columns"]]
    assert "user_id" in leading, f"{label} has no index starting with user_id: {constraints}"


_OUR_APPS = ("accounts", "billing_app", "sessions_app", "files_app")


@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="read from PostgreSQL's catalogue")
def test_no_index_is_the_beginning_of_another():
    """Each insert (and each update that moves a row) writes every index of its table: an
    index whose columns begin another one's answers nothing that one cannot, at that cost.
    (Django gives every foreign key an index of its own unless told `db_index=False`.)"""
    tables = [model._meta.db_table for app in _OUR_APPS for model in apps.get_app_config(app).get_models()]
    with connection.cursor() as cursor:
        # Plain (non-partial, non-expression) btree indexes: name, unique, columns in order.
        cursor.execute("""
            SELECT t.relname, i.relname, x.indisunique, x.indkey::int2[]
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_am am ON am.oid = i.relam
            WHERE t.relname = ANY(%s) AND am.amname = 'btree' AND x.indpred IS NULL AND x.indexprs IS NULL""",
                       [tables])
        indexes = cursor.fetchall()
    redundant = [(table, name, other) for table, name, unique, columns in indexes if not unique
                 for table_b, other, _, columns_b in indexes
                 if table_b == table and other != name and columns_b[:len(columns)] == columns
                 and (len(columns_b) > len(columns) or name > other)]
    assert redundant == []


def test_one_wallet_per_user(alice):
    with pytest.raises(IntegrityError), transaction.atomic():
        Wallet.objects.create(user=alice)


def test_ledger_amounts_cannot_be_null(alice):
    wallet = Wallet.objects.get(user=alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(wallet=wallet, user=alice, kind="grant", amount=None, balance_after=Decimal("1"))


def test_a_debit_cannot_be_positive(alice):
    wallet = Wallet.objects.get(user=alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(wallet=wallet, user=alice, kind="debit", amount=Decimal("1"),
                                   balance_after=Decimal("11"))


# --- The OpenAPI schema -----------------------------------------------------------------

PREFIX = "/api/v1"
# Every operation of SPEC section 4 that api_urls serves, and its successes.
OPERATIONS = {
    ("get", "/models"): {"200"},
    ("get", "/wallet"): {"200"},
    ("get", "/wallet/ledger"): {"200"},
    ("get", "/usage"): {"200"},
    ("get", "/keys"): {"200"},
    ("post", "/keys"): {"201"},
    ("patch", "/keys/{key_id}"): {"200"},
    ("delete", "/keys/{key_id}"): {"204"},
    ("get", "/sessions"): {"200"},
    ("post", "/sessions"): {"201"},
    ("get", "/sessions/{session_id}"): {"200"},
    ("patch", "/sessions/{session_id}"): {"200"},
    ("delete", "/sessions/{session_id}"): {"204"},
    ("get", "/sessions/{session_id}/messages"): {"200"},
    ("get", "/sessions/{session_id}/export"): {"200"},
    ("get", "/search"): {"200"},
    ("get", "/sessions/{session_id}/turns"): {"200"},
    ("post", "/sessions/{session_id}/turns"): {"201"},
    ("post", "/sessions/{session_id}/turns/stream"): {"200"},
    ("get", "/turns/{turn_id}"): {"200"},
    ("get", "/turns/{turn_id}/events"): {"200"},
    ("post", "/turns/{turn_id}/cancel"): {"200", "202"},
    ("get", "/files"): {"200"},
    ("post", "/files"): {"201"},
    ("get", "/files/{file_id}"): {"200"},
    ("delete", "/files/{file_id}"): {"204"},
}
PAGES = {"/wallet/ledger": "LedgerEntry", "/usage": "UsageRecord", "/keys": "ApiKey", "/sessions": "Session",
         "/sessions/{session_id}/messages": "Message", "/sessions/{session_id}/turns": "Turn", "/files": "File",
         "/search": "SearchHit"}
# Refusals the SPEC names, beyond the 401 every operation has.
REFUSALS = {
    ("post", "/sessions"): {"400"},
    ("get", "/usage"): {"400", "404"},
    ("get", "/keys"): {"403"},
    ("post", "/keys"): {"400", "403"},
    ("patch", "/keys/{key_id}"): {"400", "403", "404"},
    ("delete", "/keys/{key_id}"): {"403", "404"},
    ("get", "/sessions/{session_id}"): {"404"},
    ("get", "/sessions/{session_id}/export"): {"400", "404"},
    ("get", "/search"): {"400"},
    ("post", "/sessions/{session_id}/turns"): {"400", "402", "404", "422", "502", "503", "504"},
    ("post", "/sessions/{session_id}/turns/stream"): {"400", "402", "404", "422", "502", "503", "504"},
    ("get", "/turns/{turn_id}"): {"404"},
    ("get", "/turns/{turn_id}/events"): {"400", "404"},
    ("post", "/turns/{turn_id}/cancel"): {"404"},
    ("post", "/files"): {"400", "413"},
    ("get", "/files/{file_id}"): {"404"},
    ("delete", "/files/{file_id}"): {"404"},
}
METHODS = {"get", "put", "patch", "post", "delete", "head", "options", "trace"}


@pytest.fixture(scope="module")
def schema():
    client = Client()
    response = client.get("/api/schema/")
    assert response.status_code == 200, response.content[:500]
    return yaml.safe_load(response.content)


def operations(schema) -> dict[tuple[str, str], dict]:
    return {(method, path.removeprefix(PREFIX)): operation for path, item in schema["paths"].items()
            for method, operation in item.items() if method in METHODS}


def test_the_schema_lists_every_path_and_method_of_the_api(schema):
    assert set(operations(schema)) == set(OPERATIONS)
    # ... and of the URL conf: a new endpoint is in the schema, with the methods it serves.
    served = {}
    for pattern in api_urls.urlpatterns:
        path = PREFIX + "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern))
        view = getattr(pattern.callback, "cls", None)
        assert view is not None, f"{path} is not a DRF view: serve it through core.schema.documented()"
        served[path] = {m.lower() for m in view().allowed_methods} - {"options", "head"}
    assert served == {path: set(item) & METHODS for path, item in schema["paths"].items()}


def test_statuses_are_the_real_ones(schema):
    for key, operation in operations(schema).items():
        codes = set(operation["responses"])
        assert {code for code in codes if code < "300"} == OPERATIONS[key], key
        assert "401" in codes, key
        assert REFUSALS.get(key, set()) <= codes, key
    assert "204" not in operations(schema)[("get", "/files/{file_id}")]["responses"]
    assert not operations(schema)[("delete", "/files/{file_id}")]["responses"]["204"].get("content")


def test_every_error_answers_the_error_body(schema):
    components = schema["components"]["schemas"]
    assert components["Error"]["required"] == ["code", "detail"]
    for key, operation in operations(schema).items():
        for code, response in operation["responses"].items():
            if code >= "400":
                assert set(response["content"]) == {"application/json"}, (key, code)
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref in {"#/components/schemas/Error", "#/components/schemas/TurnError",
                               "#/components/schemas/CreditError"}, (key, code)
    turn_error = components["TurnError"]
    assert set(turn_error["required"]) == {"detail", "code", "turn_id"}


def test_lists_are_pages(schema):
    components = schema["components"]["schemas"]
    for path, item in PAGES.items():
        ref = operations(schema)[("get", path)]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        page = components[ref.rsplit("/", 1)[1]]
        assert set(page["required"]) == {"count", "next", "previous", "results"}, path
        assert page["properties"]["results"]["items"]["$ref"] == f"#/components/schemas/{item}", path
        parameters = {p["name"] for p in operations(schema)[("get", path)].get("parameters", [])}
        assert {"page", "page_size"} <= parameters, path
    models = operations(schema)[("get", "/models")]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["type"] == "array"  # the catalogue is not paged


def test_security_schemes_are_bearer_keys_and_the_session_cookie(schema):
    schemes = schema["components"]["securitySchemes"]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    assert "Authorization: Bearer" in schemes["bearerAuth"]["description"]
    assert schemes["cookieAuth"] == {"type": "apiKey", "in": "cookie", "name": "sessionid"}
    for key, operation in operations(schema).items():
        assert operation["security"] == [{"bearerAuth": []}, {"cookieAuth": []}], key


def test_the_stream_is_documented_as_server_sent_events(schema):
    for key in [("post", "/sessions/{session_id}/turns/stream"), ("get", "/turns/{turn_id}/events")]:
        ok = operations(schema)[key]["responses"]["200"]
        assert set(ok["content"]) == {"text/event-stream"}, key
        event = ok["content"]["text/event-stream"]["schema"]
        assert event["properties"]["event"]["enum"] == ["start", "chunk", "done", "error"]
        assert set(event["required"]) == {"id", "event", "data"}
        for name, fields in {"start": ["turn_id", "session_id", "model"], "chunk": ["delta"],
                             "done": ["message_id", "status", "usage", "cost", "balance", "served_model",
                                      "provider_model"],
                             "error": ["code", "message", "turn_id"]}.items():
            assert f"`{name}`" in ok["description"], (key, name)
            for field in fields:
                assert f'"{field}"' in ok["description"], (key, name, field)
    stream = operations(schema)[("post", "/sessions/{session_id}/turns/stream")]
    assert stream["requestBody"]["content"]["application/json"]["schema"]["$ref"] == \
        "#/components/schemas/TurnRequestRequest"
    headers = {p["name"] for p in stream["parameters"] if p["in"] == "header"}
    assert headers == {"Idempotency-Key"}


def test_the_turn_bodies_are_declared(schema):
    components = schema["components"]["schemas"]
    request = components["TurnRequestRequest"]
    assert request["required"] == ["content"]
    assert set(request["properties"]) == {"content", "model", "models", "tools_enabled", "max_tokens", "resumable"}
    result = operations(schema)[("post", "/sessions/{session_id}/turns")]["responses"]["201"]
    assert result["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/TurnResult"
    assert set(components["TurnResult"]["required"]) == {"turn", "message", "usage", "cost", "balance"}
    turn = components["Turn"]
    assert set(turn["required"]) == {"id", "session_id", "kind", "status", "model", "served_model",
                                     "provider_model", "usage", "cost", "created_at", "finished_at"}
    assert components["TurnKindEnum"]["enum"] == ["chat", "title"]
    assert components["TurnStatusEnum"]["enum"] == ["running", "completed", "cancelled", "failed", "interrupted"]
    upload = operations(schema)[("post", "/files")]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data"}


def test_search_and_export_are_declared(schema):
    search = operations(schema)[("get", "/search")]
    (q,) = [p for p in search["parameters"] if p["name"] == "q"]
    assert q["required"] is True and (q["schema"]["minLength"], q["schema"]["maxLength"]) == (1, 200)
    components = schema["components"]["schemas"]
    assert components["SearchHit"]["required"] == ["created_at", "message_id", "session_id", "snippet", "title"]
    assert components["SearchHit"]["properties"]["message_id"]["nullable"] is True
    export = operations(schema)[("get", "/sessions/{session_id}/export")]
    (fmt,) = [p for p in export["parameters"] if p["name"] == "format"]
    assert fmt["schema"]["enum"] == ["json", "md"] and fmt["schema"]["default"] == "md"
    content = export["responses"]["200"]["content"]
    assert content["text/markdown"]["schema"]["type"] == "string"
    assert content["application/json"]["schema"]["$ref"] == "#/components/schemas/Export"
    assert set(components["Export"]["required"]) == {"session", "messages", "turns", "exported_at"}
    assert {"id", "parent_id", "role", "content", "created_at"} <= set(components["ExportMessage"]["required"])
    assert "406" not in export["responses"]  # its Accept is not negotiated: ?format= decides


def test_spectacular_validates_the_schema_without_a_warning(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert yaml.safe_load((tmp_path / "schema.yaml").read_text())["paths"]


def test_fetching_the_schema_prints_no_warning(capfd):
    response = Client().get("/api/schema/?format=json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    assert json.loads(response.content)["info"]["title"] == "Pantheon API"
    assert not GENERATOR_STATS, "drf-spectacular warned while generating the schema"
    err = capfd.readouterr().err
    assert "Warning" not in err and "Error" not in err, err


# --- The docs page ----------------------------------------------------------------------

class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.inline_scripts, self.schema_url = [], 0, None
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [attrs[name] for name in ("src", "href") if attrs.get(name)]
        self.schema_url = attrs.get("data-schema-url", self.schema_url)
        self._in_script = tag == "script"
        if tag == "script" and not attrs.get("src"):
            self.inline_scripts += 1

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1


@pytest.mark.django_db
def test_the_docs_page_serves_swagger_ui_from_local_static_files():
    response = Client().get("/api/docs/")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    page = _Assets()
    page.feed(response.content.decode())
    assert page.schema_url == "/api/schema/"
    assert page.inline_scripts == 0  # works under a Content-Security-Policy without 'unsafe-inline'
    assert len(page.urls) >= 4
    for url in page.urls:
        assert url.startswith("/static/"), url  # no CDN, no other host
        assert finders.find(url.removeprefix("/static/")), url
    initializer = finders.find("web/api-docs.js")
    text = open(initializer).read()
    assert "validatorUrl: null" in text and "http" not in text
    assert open(finders.find("web/swagger-ui/VERSION")).read().startswith("swagger-ui-dist@")


def test_the_docs_page_and_its_files_over_the_live_server(live_server_url):
    with httpx.Client(base_url=live_server_url, timeout=10) as http:
        page = http.get("/api/docs/")
        assert page.status_code == 200
        assets = _Assets()
        assets.feed(page.text)
        for url in assets.urls:
            assert http.get(url).status_code == 200, url
        assert http.get("/api/docs", follow_redirects=False).headers["location"] == "/api/docs/"
        assert http.get(assets.schema_url).status_code == 200


# --- JSON 404 and 405 under /api/ ------------------------------------------------------

NOT_FOUND = [
    ("get", "/api/v1/anything-unknown"),
    ("get", "/api/v1/sessions/"),  # a trailing slash
    ("get", "/api/schema/x"),
    ("get", "/api/"),
    ("get", "/api"),
    ("get", "/api/v1/turns/not-a-uuid"),
    ("get", "/api/v1/sessions/not-a-uuid/turns"),
    ("post", "/api/v1/anything-unknown"),  # not a CSRF failure either
    ("delete", "/api/v1/anything-unknown"),
    ("get", "/api/schema/?format=xml"),
]
NOT_ALLOWED = [
    ("delete", "/api/v1/turns/{id}", {"GET"}),
    ("post", "/api/v1/turns/{id}", {"GET"}),
    ("get", "/api/v1/turns/{id}/cancel", {"POST"}),
    ("put", "/api/v1/turns/{id}/events", {"GET"}),
    ("get", "/api/v1/sessions/{id}/turns/stream", {"POST"}),
    ("put", "/api/v1/sessions/{id}/turns", {"GET", "POST"}),
    ("post", "/api/v1/wallet", {"GET"}),
    ("put", "/api/v1/sessions", {"GET", "POST"}),
    ("post", "/api/v1/files/{id}", {"GET", "DELETE"}),
    ("post", "/api/v1/search", {"GET"}),
    ("delete", "/api/v1/sessions/{id}/export", {"GET"}),
    ("post", "/api/schema/", {"GET"}),
    ("post", "/api/docs/", {"GET"}),
]


def _json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json", response["Content-Type"]
    body = json.loads(response.content)
    assert body["code"] == code and body["detail"], body
    return body


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
@pytest.mark.parametrize(("method", "path"), NOT_FOUND)
def test_unknown_api_paths_answer_a_json_404(settings, alice_api, debug, method, path):
    settings.DEBUG = debug
    alice_api.raise_request_exception = False
    _json_error(getattr(alice_api, method)(path), 404, "not_found")
    anonymous = Client(enforce_csrf_checks=True, raise_request_exception=False)
    _json_error(getattr(anonymous, method)(path), 404, "not_found")


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
@pytest.mark.parametrize(("method", "path", "allowed"), NOT_ALLOWED)
def test_wrong_methods_answer_a_json_405(settings, alice_api, debug, method, path, allowed):
    settings.DEBUG = debug
    alice_api.raise_request_exception = False
    response = getattr(alice_api, method)(path.replace("{id}", str(uuid.uuid4())))
    _json_error(response, 405, "method_not_allowed")
    assert allowed <= {m.strip() for m in response["Allow"].split(",")}
