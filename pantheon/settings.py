"""Pantheon settings. Everything an operator may change comes from the environment
(see the configuration table in README.md)."""

import os
import tempfile
from pathlib import Path

import dj_database_url
from csp import constants as csp_constants
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from core.pool import checker, note_returned
from pantheon.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

# Off unless asked for: bin/run sets DJANGO_DEBUG=true for the local run.
DEBUG = env_bool("DJANGO_DEBUG", False)
# Debug only: a random key (sessions do not survive a restart). Without debug it must be
# set to serve: pantheon/asgi.py refuses to start without it, and Django raises wherever a
# key is used; commands that need none (migrate, makemigrations --check) still run.
SECRET_KEY = env_str("DJANGO_SECRET_KEY") or (get_random_secret_key() if DEBUG else "")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
# Origins (scheme://host[:port]) whose unsafe requests with the session cookie pass the
# CSRF check, e.g. https://chat.example.com when the proxy's host differs from the Host header.
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# --- Behind TLS (docs/deploy.md) -------------------------------------------------------
# PANTHEON_HTTPS=true: cookies only over HTTPS, HSTS, and plain HTTP redirected to HTTPS
# (except /healthz and /metrics, which a load balancer or Prometheus may fetch over plain
# HTTP from inside). Behind a proxy that ends TLS, PANTHEON_PROXY_SSL_HEADER=true trusts
# its X-Forwarded-Proto (only when every request comes through that proxy, which must set
# the header itself).
PANTHEON_HTTPS = env_bool("PANTHEON_HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = PANTHEON_HTTPS
SECURE_SSL_REDIRECT = env_bool("PANTHEON_SSL_REDIRECT", PANTHEON_HTTPS)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("PANTHEON_HSTS_SECONDS", 31_536_000 if PANTHEON_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PANTHEON_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("PANTHEON_HSTS_PRELOAD", False)
if env_bool("PANTHEON_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# The middleware are subclasses of Django's (core/middleware.py), which Django's checks for
# SecurityMiddleware, XFrameOptionsMiddleware and CsrfViewMiddleware do not recognise (they
# look for the exact dotted path, and then skip every check of their settings):
# core/checks.py runs those checks against the subclasses instead. Preloading HSTS is a
# commitment of the whole domain, chosen with PANTHEON_HSTS_PRELOAD, not a warning.
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]
if not SECURE_HSTS_PRELOAD:
    SILENCED_SYSTEM_CHECKS.append("security.W021")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Before django_tasks_db: core's db_worker (which also starts the periodic tasks) wins.
    "core",
    "django_tasks_db",
    "accounts",
    "billing_app",
    "sessions_app",
    "files_app",
    "web",
    "csp",  # django-csp: the Content-Security-Policy header (CONTENT_SECURITY_POLICY below)
]

# Django's own middleware, in subclasses that run their hooks on the event loop instead of
# one thread hop per hook (core/middleware.py); a sync middleware would cost a thread per
# request.
MIDDLEWARE = [
    "core.middleware.RequestLogMiddleware",  # first: the request id, the access log line
    "core.middleware.SecurityMiddleware",
    "web.csp.CSPMiddleware",  # django-csp's, its hooks inline (web/csp.py)
    "core.middleware.SessionMiddleware",
    "core.middleware.CommonMiddleware",
    "core.middleware.CsrfViewMiddleware",
    "core.middleware.AuthenticationMiddleware",
    "core.middleware.MessageMiddleware",
    "core.middleware.XFrameOptionsMiddleware",
]

# --- Content-Security-Policy (django-csp; docs/chat-page.md) ---------------------------
# Every page: scripts, styles, fetches and images from Pantheon itself only; no inline
# script or style, no plugin, no <base>, never framed. The chat page renders model output
# as sanitized Markdown: this makes a sanitizer bug a blocked script, not a stolen session.
# img-src allows data: for the favicon placeholder and Swagger UI's and the admin's icons.
# NONCE is left out of the header unless the page rendered the nonce: only templates that
# use `{% csp_nonce_attr %}` (the admin's, e.g. the usage report's <style>) get one; the chat
# page and /api/docs/ render none, so their script-src and style-src are 'self' alone.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [csp_constants.SELF],
        "script-src": [csp_constants.SELF, csp_constants.NONCE],
        "style-src": [csp_constants.SELF, csp_constants.NONCE],
        "img-src": [csp_constants.SELF, "data:"],
        "connect-src": [csp_constants.SELF],
        "object-src": [csp_constants.NONE],
        "base-uri": [csp_constants.NONE],
        "frame-ancestors": [csp_constants.NONE],
        "form-action": [csp_constants.SELF],
    },
}

ROOT_URLCONF = "pantheon.urls"
ASGI_APPLICATION = "pantheon.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "web.context_processors.csp_nonce",  # {% csp_nonce_attr %} (the admin's) gets django-csp's nonce
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
# CONN_MAX_AGE stays 0 under ASGI (each sync_to_async call may run on a new thread;
# persistent connections leak, Django #32889). PostgreSQL gets psycopg's pool instead.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=0,
        conn_health_checks=True,
    )
}
# A pooled connection is checked with a round trip only after it sat idle (core/pool.py).
PANTHEON_DB_CHECK_IDLE_SECONDS = env_float("PANTHEON_DB_CHECK_IDLE_SECONDS", 2.0, minimum=0.0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("PANTHEON_DB_POOL_MIN", 2),
        "max_size": env_int("PANTHEON_DB_POOL_MAX", 20, minimum=1),
        # How long a request waits for a free connection before failing.
        "timeout": env_float("PANTHEON_DB_POOL_TIMEOUT", 10.0, minimum=0.1),
        "check": checker(PANTHEON_DB_CHECK_IDLE_SECONDS),
        "reset": note_returned,
    }
# The threads of the async views' database work (core.db.call_threads): few, because each
# more thread competes for the GIL with the event loop; raise it for a database far away.
PANTHEON_DB_CALL_THREADS = env_int("PANTHEON_DB_CALL_THREADS", 4, minimum=1)
# On PostgreSQL a turn's preflight, renewals and close run on the event loop's own thread,
# on async connections of its own (core/db_on_loop.py); false runs them on the call threads.
PANTHEON_DB_ON_LOOP = env_bool("PANTHEON_DB_ON_LOOP", True)
# How many such connections one event loop keeps at most. Not the threads' four: under load a
# unit keeps its connection while the busy loop gets round to each answer, so four made the
# preflights of 200 streams queue for them (docs/performance.md); a connection on the loop
# costs no thread and no GIL.
PANTHEON_DB_LOOP_CONNECTIONS = env_int("PANTHEON_DB_LOOP_CONNECTIONS", 16, minimum=1)
# The hot statements of a turn (core/sql.py) are prepared on each pooled connection. Turn it
# off behind a pooler that cannot keep prepared statements (PgBouncer's transaction mode
# before 1.21, or without max_prepared_statements).
PANTHEON_DB_PREPARED_STATEMENTS = env_bool("PANTHEON_DB_PREPARED_STATEMENTS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the worker and the server share the file; wait instead of failing on a lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE",
         "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    )
    # A file, not :memory:, so tests can run the worker and commands in subprocesses;
    # one per test run, so parallel runs do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"pantheon-test-{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_ROOT = Path(env_str("PANTHEON_MEDIA_ROOT", str(BASE_DIR / "media")))

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# --- API ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "core.api.Pagination",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
# The OpenAPI schema (/api/schema/, docs page /api/docs/; see docs/api.md).
SPECTACULAR_SETTINGS = {
    "TITLE": "Pantheon API",
    "VERSION": "1.0.0",
    "DESCRIPTION": (
        "The JSON API of Pantheon, an LLM chat backend. Authenticate with an API key "
        "(`Authorization: Bearer <key>`) or, from the browser, with the session cookie (writes need the "
        "`X-CSRFToken` header). Every error answers `{\"detail\", \"code\"}`. Ids are UUIDs; money is a "
        "decimal string with 6 places. Lists are pages: `{\"count\", \"next\", \"previous\", \"results\"}`."
    ),
    "SERVE_INCLUDE_SCHEMA": False,  # the schema describes the API, not itself
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # Separate request and response components, so what every response carries is `required`.
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "core.schema.require_response_fields", "core.schema.drf_refusals"],
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
    "ENUM_NAME_OVERRIDES": {
        "TurnStatusEnum": "sessions_app.models.Turn.Status",
        "MessageRoleEnum": "sessions_app.models.Message.Role",
        "FileStatusEnum": "files_app.models.UploadedFile.Status",
        "LedgerKindEnum": "billing_app.models.LedgerEntry.Kind",
        "TurnKindEnum": "sessions_app.models.Turn.Kind",
    },
}

# --- Background tasks ------------------------------------------------------------------
# Queues: "default" (turn sweep, reconciliation) and "files" (text extraction, which may
# take up to PANTHEON_EXTRACT_TIMEOUT_SECONDS a file): a worker per queue keeps the sweep
# from waiting behind uploads (docs/files.md).
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default", "files"]}}

# --- Pantheon -------------------------------------------------------------------------
OPENROUTER_API_KEY = env_str("OPENROUTER_API_KEY")
OPENROUTER_BASE_URL = env_str("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1").rstrip("/")
PANTHEON_LLM_PROVIDER = env_str("PANTHEON_LLM_PROVIDER", "openrouter" if OPENROUTER_API_KEY else "fake")
if PANTHEON_LLM_PROVIDER not in {"openrouter", "fake"}:
    raise ImproperlyConfigured("PANTHEON_LLM_PROVIDER must be 'openrouter' or 'fake'")
PANTHEON_DEFAULT_MODEL = env_str(
    "PANTHEON_DEFAULT_MODEL", "openai/gpt-4o-mini" if PANTHEON_LLM_PROVIDER == "openrouter" else "fake/echo"
)
PANTHEON_CREDIT_ENFORCEMENT = env_bool("PANTHEON_CREDIT_ENFORCEMENT", True)
PANTHEON_MAX_OUTPUT_TOKENS = env_int("PANTHEON_MAX_OUTPUT_TOKENS", 1024, minimum=1)
PANTHEON_MIN_OUTPUT_TOKENS = env_int("PANTHEON_MIN_OUTPUT_TOKENS", 16, minimum=1)
PANTHEON_HEARTBEAT_SECONDS = env_float("PANTHEON_HEARTBEAT_SECONDS", 15.0)
PANTHEON_UPSTREAM_TIMEOUT_SECONDS = env_float("PANTHEON_UPSTREAM_TIMEOUT_SECONDS", 60.0)
# The longest a model call may run in all, however it keeps the connection alive (a provider
# sending only keep-alives would otherwise hold its credits forever).
PANTHEON_MAX_TURN_SECONDS = env_float("PANTHEON_MAX_TURN_SECONDS", 900.0, minimum=1)
PANTHEON_UPSTREAM_MAX_RETRIES = env_int("PANTHEON_UPSTREAM_MAX_RETRIES", 2)
PANTHEON_MAX_UPLOAD_BYTES = env_int("PANTHEON_MAX_UPLOAD_BYTES", 10 * 1024 * 1024, minimum=1)
# Text extraction of uploads (docs/files.md): a PDF with more pages fails; text is cut at
# MAX_CHARS (the file is ready, `truncated`); a PDF is read in a child process killed
# after TIMEOUT seconds and limited to MAX_MEMORY_MB of address space (0: no limit).
PANTHEON_PDF_MAX_PAGES = env_int("PANTHEON_PDF_MAX_PAGES", 500, minimum=1)
PANTHEON_EXTRACT_MAX_CHARS = env_int("PANTHEON_EXTRACT_MAX_CHARS", 2_000_000, minimum=1)
PANTHEON_EXTRACT_TIMEOUT_SECONDS = env_float("PANTHEON_EXTRACT_TIMEOUT_SECONDS", 30.0, minimum=1)
PANTHEON_EXTRACT_MAX_MEMORY_MB = env_int("PANTHEON_EXTRACT_MAX_MEMORY_MB", 512, minimum=0)
# A running turn renews its lease (and so its hold) at least every third of this; the
# sweep closes a turn whose lease lapsed, and runs on the db_worker this often (SPEC 10).
PANTHEON_TURN_LEASE_SECONDS = env_float("PANTHEON_TURN_LEASE_SECONDS", 30.0, minimum=2)
PANTHEON_CHECKPOINT_SECONDS = env_float("PANTHEON_CHECKPOINT_SECONDS", 2.0, minimum=0.05)
# SPEC section 12: a resumable turn keeps generating this long with no client attached.
PANTHEON_RESUME_GRACE_SECONDS = env_float("PANTHEON_RESUME_GRACE_SECONDS", 30.0, minimum=0)
# SPEC section 13: wait before an estimated turn is checked against the provider's record.
PANTHEON_RECONCILE_DELAY_SECONDS = env_float("PANTHEON_RECONCILE_DELAY_SECONDS", 60.0, minimum=0)
# SPEC section 15: a model that failed this many turns in a row is skipped this long (per
# process) while another candidate remains.
PANTHEON_COOLDOWN_FAILURES = env_int("PANTHEON_COOLDOWN_FAILURES", 3, minimum=1)
PANTHEON_COOLDOWN_SECONDS = env_float("PANTHEON_COOLDOWN_SECONDS", 30.0, minimum=0)
# SPEC section 16: limits per user across all their keys and their browser login (0 or unset: none).
PANTHEON_USER_RPM = env_int("PANTHEON_USER_RPM", 0, minimum=0) or None
PANTHEON_USER_MAX_PARALLEL = env_int("PANTHEON_USER_MAX_PARALLEL", 0, minimum=0) or None
# SPEC section 17: an untitled session gets a title written by a model after its first answer.
PANTHEON_AUTO_TITLE = env_bool("PANTHEON_AUTO_TITLE", True)
PANTHEON_TITLE_MODEL = env_str("PANTHEON_TITLE_MODEL", "")  # empty: the session's model
PANTHEON_MAX_MESSAGE_CHARS = env_int("PANTHEON_MAX_MESSAGE_CHARS", 32000, minimum=1)
PANTHEON_CONTEXT_BUDGET_TOKENS = env_int("PANTHEON_CONTEXT_BUDGET_TOKENS", 8000, minimum=1)
PANTHEON_MAX_TOOL_ROUNDS = env_int("PANTHEON_MAX_TOOL_ROUNDS", 4, minimum=1)
PANTHEON_FAKE_CHUNK_DELAY_SECONDS = env_float("PANTHEON_FAKE_CHUNK_DELAY_SECONDS", 0.05)
PANTHEON_APP_URL = env_str("PANTHEON_APP_URL", "https://github.com/pantheon")
PANTHEON_APP_TITLE = env_str("PANTHEON_APP_TITLE", "Pantheon")
# Password logins (/accounts/login/, /admin/login/; accounts/login_limit.py): a username
# with this many failures in the window, or a client address with this many, is refused
# (429) until its oldest failures leave the window; counted in the database, so across all
# workers. A success clears the username's count.
PANTHEON_LOGIN_FAILURES_PER_USER = env_int("PANTHEON_LOGIN_FAILURES_PER_USER", 5, minimum=1)
PANTHEON_LOGIN_FAILURES_PER_IP = env_int("PANTHEON_LOGIN_FAILURES_PER_IP", 20, minimum=1)
PANTHEON_LOGIN_WINDOW_SECONDS = env_int("PANTHEON_LOGIN_WINDOW_SECONDS", 900, minimum=1)
# How many proxies of ours append to X-Forwarded-For in front of the app (nginx: 1): the
# client address of the login limit is the one the outermost saw. 0: REMOTE_ADDR.
PANTHEON_TRUSTED_PROXY_COUNT = env_int("PANTHEON_TRUSTED_PROXY_COUNT", 0)
# GET /metrics (Prometheus, docs/metrics.md): set, it needs `Authorization: Bearer <token>`;
# unset, only direct loopback clients (no proxy headers) may read it.
PANTHEON_METRICS_TOKEN = env_str("PANTHEON_METRICS_TOKEN")
# Upload bodies above this stay on disk while parsed, not in memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(2_621_440, PANTHEON_MAX_UPLOAD_BYTES + 1_048_576)

# --- Logs (core/logging.py) ------------------------------------------------------------
# One handler, on the root logger, writing to stderr: one JSON object per line in
# production, readable lines when debugging; each with request_id, user_id, turn_id.
PANTHEON_LOG_FORMAT = env_str("PANTHEON_LOG_FORMAT", "text" if DEBUG else "json")
if PANTHEON_LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured("PANTHEON_LOG_FORMAT must be 'json' or 'text'")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "core.logging.JsonFormatter"},
        "text": {"()": "core.logging.TextFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": PANTHEON_LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env_str("PANTHEON_LOG_LEVEL", "INFO")},
    "loggers": {
        # Django's default logging gives "django" a console handler of its own (active
        # with DEBUG), and its records also reach root's: every line was printed twice.
        "django": {"handlers": [], "propagate": True},
        # 4xx are in the access log already (pantheon.access); 5xx stay, with the traceback.
        "django.request": {"level": "ERROR"},
        # uvicorn's lines (start-up, its errors) in the same format. Not "uvicorn": that
        # would reset its child "uvicorn.access", and uvicorn's access log would come back
        # with --no-access-log (the middleware writes one, with user and timings).
        "uvicorn.error": {"handlers": ["console"], "propagate": False},
        # One line per upstream request is too much at INFO; LLM events record every call.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
