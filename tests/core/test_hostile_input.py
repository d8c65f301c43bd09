"""Hostile client input on the endpoints that do not talk to the model, through a real
uvicorn server: never a 500, and a 400 with a `code` for what cannot be taken (SPEC 4, 10).

Bodies are raw bytes, so JSON escapes such as `\\u0000` and `\\ud800` reach the server as
sent (a client library would refuse to encode some of them).
"""

from __future__ import annotations

import re

import httpx
import pytest
from django.conf import settings as django_settings

from core.text import find_unstorable
from files_app.models import UploadedFile
from sessions_app.models import ChatSession
from tests.conftest import MODEL, client_for

BOUNDARY = "hostileboundary"


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def api(alice, price, settings, live_server_url):
    """An httpx client of the live server with Alice's Bearer key; new sessions use MODEL."""
    settings.PANTHEON_DEFAULT_MODEL = MODEL
    with httpx.Client(base_url=live_server_url, timeout=30,
                      headers={"Authorization": f"Bearer {client_for(alice).raw_key}"}) as client:
        yield client


def post_json(api: httpx.Client, path: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return api.post(path, content=body, headers={"Content-Type": content_type})


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    body = response.json()
    assert body["code"] == code and body["detail"], body


def multipart(disposition: bytes, payload: bytes = b"hello", *, charset: str | None = None) -> tuple[bytes, dict]:
    """One multipart part with a raw Content-Disposition (so any filename bytes get through)."""
    body = (f"--{BOUNDARY}\r\n".encode() + b"Content-Disposition: form-data; " + disposition
            + b"\r\nContent-Type: text/plain\r\n\r\n" + payload + f"\r\n--{BOUNDARY}--\r\n".encode())
    content_type = f"multipart/form-data; boundary={BOUNDARY}" + (f"; charset={charset}" if charset else "")
    return body, {"Content-Type": content_type}


# --- NUL and unpaired surrogates: 400 invalid_text ---------------------------------------

@pytest.mark.parametrize("field", ["title", "model", "system_prompt"])
@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800", "\\udfff", "\\ud83d"])
def test_unstorable_text_in_a_session_field_is_invalid_text(api, field, escape):
    response = post_json(api, "/api/v1/sessions", f'{{"{field}": "a{escape}b"}}'.encode())
    assert_error(response, 400, "invalid_text")
    assert response.json()["detail"].startswith(f"{field}: ")
    assert not ChatSession.objects.exists()


def test_nul_in_a_multipart_session_field_is_invalid_text(api):
    body, headers = multipart(b'name="title"', b"a\x00b")
    assert_error(api.post("/api/v1/sessions", content=body, headers=headers), 400, "invalid_text")
    assert not ChatSession.objects.exists()


def test_a_surrogate_pair_is_one_character_and_is_accepted(api):
    response = post_json(api, "/api/v1/sessions", b'{"title": "smile \\ud83d\\ude00"}')
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "smile \U0001f600" == ChatSession.objects.get().title


# --- JSON the parser cannot follow: 400 invalid_json -------------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 20_000 + b"]" * 20_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"title": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    b"[" * 20_000,  # not even closed: the depth is hit first
], ids=["array", "object", "inside-a-field", "unclosed"])
def test_deeply_nested_json_is_invalid_json(api, body):
    assert_error(post_json(api, "/api/v1/sessions", body), 400, "invalid_json")
    assert not ChatSession.objects.exists()


def test_deeply_nested_json_sent_to_the_upload_endpoint_is_invalid_json(api):
    assert_error(post_json(api, "/api/v1/files", b"[" * 20_000), 400, "invalid_json")
    assert not UploadedFile.objects.exists()


# --- Other bodies that are not a JSON object: 400 with a code ----------------------------

@pytest.mark.parametrize(("body", "content_type", "code"), [
    (b'{"title": "\xff\xfe"}', "application/json", "parse_error"),  # not UTF-8
    (b"\xff\xfe\xfd", "application/json", "parse_error"),
    (b'{"title": "caf\xe9"}', "application/json", "parse_error"),  # latin-1
    (b'{"title": "\xed\xa0\x80"}', "application/json", "parse_error"),  # a surrogate, UTF-8 encoded
    (b'{"title": "a\x00b"}', "application/json", "parse_error"),  # a raw NUL byte: a control character
    (b"\x00", "application/json", "parse_error"),
    (b"{not json", "application/json", "parse_error"),
    (b'{"title": "x"} trailing', "application/json", "parse_error"),
    (b"   ", "application/json", "parse_error"),
    (b'{"title": NaN}', "application/json", "parse_error"),
    (b'{"title": ' + b"9" * 5000 + b"}", "application/json", "parse_error"),  # over Python's int digits limit
    (b"null", "application/json", "invalid_null"),
    (b"[]", "application/json", "invalid"),
    (b'[{"title": "x"}]', "application/json", "invalid"),
    (b'"a string"', "application/json", "invalid"),
    (b"12", "application/json", "invalid"),
    (b"true", "application/json", "invalid"),
    (b'{"title": "x"}', "text/plain", "unsupported_media_type"),
    (b"title=x", "application/x-www-form-urlencoded", "unsupported_media_type"),
    (b"x", "multipart/form-data", "parse_error"),  # no boundary
], ids=lambda value: value[:20].decode("latin-1") if isinstance(value, bytes) else None)
def test_bodies_that_are_not_a_json_object_are_400_with_a_code(api, body, content_type, code):
    response = post_json(api, "/api/v1/sessions", body, content_type)
    assert_error(response, 415 if code == "unsupported_media_type" else 400, code)
    assert not ChatSession.objects.exists()


def test_an_empty_body_creates_a_session_with_the_defaults(api):
    """Chosen, not an accident: every field is optional, and `curl -X POST` with no body
    is a request for a session with the defaults, as `{}` is."""
    response = post_json(api, "/api/v1/sessions", b"")
    assert response.status_code == 201 and response.json()["title"] == ""


@pytest.mark.parametrize(("body", "code"), [
    (b'{"title": ["a"]}', "invalid"),
    (b'{"title": {"a": 1}}', "invalid"),
    (b'{"title": true}', "invalid"),
    (b'{"title": null}', "invalid_null"),
    (b'{"title": "' + b"x" * 201 + b'"}', "invalid_max_length"),
    (b'{"model": ["x"]}', "invalid"),
    (b'{"model": 12}', "unknown_model"),
    (b'{"model": "' + b"m" * 5000 + b'"}', "invalid_max_length"),
    (b'{"system_prompt": {"a": 1}}', "invalid"),
    (b'{"system_prompt": "' + b"x" * 40_000 + b'"}', "invalid_max_length"),
])
def test_wrong_types_and_sizes_in_session_fields_are_400(api, body, code):
    assert_error(post_json(api, "/api/v1/sessions", body), 400, code)
    assert not ChatSession.objects.exists()


# --- Query parameters --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["%00", "not-a-uuid", "%ED%A0%80", "%FF", "a" * 5000])
def test_a_usage_filter_that_is_not_a_session_id_is_400(api, value):
    assert_error(api.get(f"/api/v1/usage?session={value}"), 400, "invalid_session")


LISTS = ["/api/v1/usage", "/api/v1/wallet/ledger", "/api/v1/sessions", "/api/v1/files"]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("page", ["%00", "abc", "0", "-1", "%ED%A0%80", "9" * 5000])
def test_a_page_that_is_not_a_page_number_is_404_with_a_code(api, path, page):
    assert_error(api.get(f"{path}?page={page}"), 404, "not_found")


ODD_QUERIES = ["page_size=abc", "page_size=%00", "page_size=-5", "page_size=0", "page_size=" + "9" * 5000,
               "%00=%00"]


@pytest.mark.parametrize(("path", "query"), [(path, query) for path in LISTS for query in ODD_QUERIES]
                         + [(path, "session=%00") for path in LISTS if path != "/api/v1/usage"])
def test_other_odd_list_parameters_fall_back_to_the_defaults(api, path, query):
    response = api.get(f"{path}?{query}")
    assert response.status_code == 200, response.text[:300]
    assert set(response.json()) == {"count", "next", "previous", "results"}


# --- Uploads -----------------------------------------------------------------------------

@pytest.mark.parametrize(("disposition", "stored_as"), [
    (b'name="file"; filename="a\x00b.txt"', "ab.txt"),  # control characters are dropped
    (b"name=\"file\"; filename*=UTF-8''a%00b.txt", "ab.txt"),
    (b"name=\"file\"; filename*=UTF-8''a%ED%A0%80b.txt", "a\ufffd\ufffd\ufffdb.txt"),  # surrogate bytes
    (b'name="file"; filename="../../etc/passwd.txt"', "passwd.txt"),
], ids=["nul", "rfc2231-nul", "rfc2231-surrogate", "path"])
def test_hostile_filenames_are_cleaned_and_stored(api, disposition, stored_as):
    body, headers = multipart(disposition)
    response = api.post("/api/v1/files", content=body, headers=headers)
    assert response.status_code == 201, response.text[:300]
    row = UploadedFile.objects.get()
    assert response.json()["filename"] == row.filename == stored_as
    assert find_unstorable(row.filename) == -1


@pytest.mark.parametrize("name", [b"a\xed\xa0\x80b.txt", b"a\xff\xfeb.txt"], ids=["surrogate-bytes", "not-utf8"])
def test_a_filename_in_raw_bytes_that_are_not_utf8_is_400(api, name):
    # Django's multipart parser cannot read the part's headers, so it finds no file field.
    body, headers = multipart(b'name="file"; filename="' + name + b'"')
    assert_error(api.post("/api/v1/files", content=body, headers=headers), 400, "file_required")


@pytest.mark.parametrize("name", [b"a" * 10_000 + b".txt", "\u00e9".encode() * 10_000 + b".txt",
                                  b"a." + b"t" * 10_000])
def test_a_10000_character_filename_is_400(api, name):
    body, headers = multipart(b'name="file"; filename="' + name + b'"')
    assert_error(api.post("/api/v1/files", content=body, headers=headers), 400, "parse_error")
    assert not UploadedFile.objects.exists()


def test_a_long_filename_under_the_header_limit_is_cut_to_255_characters(api):
    # Django's multipart parser reads at most 1024 bytes of part headers.
    body, headers = multipart(b'name="file"; filename="' + b"a" * 600 + b'.txt"')
    response = api.post("/api/v1/files", content=body, headers=headers)
    assert response.status_code == 201, response.text[:300]
    filename = response.json()["filename"]
    assert len(filename) == 255 and filename.endswith(".txt")


# --- Charsets and Content-Type headers Django cannot handle ------------------------------

@pytest.mark.parametrize("charset", ["idna", "IDNA", "undefined", "base64", "zlib_codec", "rot13"])
@pytest.mark.parametrize("path", ["/api/v1/sessions", "/api/v1/files"])
def test_multipart_in_a_charset_that_cannot_decode_text_is_400(api, path, charset):
    body, headers = multipart(b'name="file"; filename="a.txt"', charset=charset)
    assert_error(api.post(path, content=body, headers=headers), 400, "unsupported_charset")
    assert not ChatSession.objects.exists() and not UploadedFile.objects.exists()


@pytest.mark.parametrize("charset", ["idna", "base64"])
def test_json_in_a_charset_that_cannot_decode_text_is_400(api, charset):
    response = post_json(api, "/api/v1/sessions", b'{"title": "x"}', f"application/json; charset={charset}")
    assert_error(response, 400, "unsupported_charset")


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", "unknown-to-python", "UTF-8"])
def test_multipart_in_an_ordinary_or_unknown_charset_still_works(api, charset):
    body, headers = multipart(b'name="file"; filename="a.txt"', charset=charset)
    response = api.post("/api/v1/files", content=body, headers=headers)
    assert response.status_code in {201, 400}, response.text[:300]  # utf-16 garbles the part names
    assert response.json()["code" if response.status_code == 400 else "status"] in {"file_required", "pending"}


@pytest.mark.parametrize("content_type", ["application/json; x=" + "a" * 10_000, "application/json; x*=bogus''y"],
                         ids=["over-10000-characters", "rfc2231-unknown-charset"])
@pytest.mark.parametrize("path", ["/api/v1/sessions", "/api/v1/files", "/healthz", "/accounts/login/",
                                  "/static/web/chat.css"])
def test_a_content_type_django_cannot_parse_is_400_everywhere(api, path, content_type):
    assert_error(api.post(path, content=b"{}", headers={"Content-Type": content_type}), 400, "invalid_content_type")


# --- The browser login form --------------------------------------------------------------

@pytest.fixture
def login_page(live_server_url):
    """(client, csrf token) after GET /accounts/login/, as a browser would have them."""
    with httpx.Client(base_url=live_server_url, timeout=30) as browser:
        page = browser.get("/accounts/login/")
        assert page.status_code == 200
        yield browser, browser.cookies[django_settings.CSRF_COOKIE_NAME]


def post_login(browser: httpx.Client, body: bytes, content_type: str) -> httpx.Response:
    return browser.post("/accounts/login/", content=body,
                        headers={"Content-Type": content_type, "Referer": f"{browser.base_url}accounts/login/"})


@pytest.mark.parametrize("fields", [b"username=al%00ice&password=pw", b"username=alice%00&password=pw",
                                    b"username=alice&password=p%00w", b"username=%ED%A0%80&password=pw",
                                    b"username=" + b"a" * 10_000 + b"&password=pw"])
def test_login_form_with_hostile_text_shows_the_form_again(alice, login_page, fields):
    browser, token = login_page
    response = post_login(browser, f"csrfmiddlewaretoken={token}&".encode() + fields,
                          "application/x-www-form-urlencoded")
    assert response.status_code == 200, response.text[:300]
    assert 'name="username"' in response.text and re.search(r"errorlist|error", response.text)
    assert django_settings.SESSION_COOKIE_NAME not in browser.cookies


def test_login_form_still_logs_in(alice, login_page):
    browser, token = login_page
    response = post_login(browser, f"csrfmiddlewaretoken={token}&username=alice&password=pw".encode(),
                          "application/x-www-form-urlencoded; charset=UTF-8")
    assert response.status_code == 302 and django_settings.SESSION_COOKIE_NAME in browser.cookies


@pytest.mark.parametrize("charset", ["idna", "base64", "undefined"])
def test_login_form_as_multipart_in_a_charset_that_cannot_decode_text_is_400(alice, login_page, charset):
    browser, token = login_page
    body, headers = multipart(b'name="csrfmiddlewaretoken"', token.encode(), charset=charset)
    assert_error(post_login(browser, body, headers["Content-Type"]), 400, "unsupported_charset")


@pytest.mark.parametrize("charset", ["latin-1", "utf8", "utf-16"])
def test_login_form_urlencoded_in_another_charset_than_utf8_is_400_even_in_debug(alice, login_page, settings,
                                                                                 charset):
    # Django refuses these itself (400), but in DEBUG its error page reads the form again: a 500.
    settings.DEBUG = True
    browser, token = login_page
    response = post_login(browser, f"csrfmiddlewaretoken={token}&username=alice&password=pw".encode(),
                          f"application/x-www-form-urlencoded; charset={charset}")
    assert_error(response, 400, "unsupported_charset")


@pytest.mark.parametrize("version", ["%0a", "%00", "x" * 300])
def test_the_schema_ignores_a_hostile_version_parameter(live_server_url, version):
    response = httpx.get(f"{live_server_url}/api/schema/?version={version}")
    assert response.status_code == 200
