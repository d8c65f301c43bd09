"""Pantheon settings. Everything an operator may change comes from the environment
(see the configuration table in README.md)."""

import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from pantheon.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", True)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG=false")
    SECRET_KEY = get_random_secret_key()  # debug only: sessions do not survive a restart
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")

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
]

# Django's own middleware, in subclasses that run their hooks on the event loop instead of
# one thread hop per hook (core/middleware.py); a sync middleware would cost a thread per
# request.
MIDDLEWARE = [
    "core.middleware.SecurityMiddleware",
    "core.middleware.SessionMiddleware",
    "core.middleware.CommonMiddleware",
    "core.middleware.CsrfViewMiddleware",
    "core.middleware.AuthenticationMiddleware",
    "core.middleware.MessageMiddleware",
    "core.middleware.XFrameOptionsMiddleware",
]

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
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("PANTHEON_DB_POOL_MIN", 2),
        "max_size": env_int("PANTHEON_DB_POOL_MAX", 20, minimum=1),
        # How long a request waits for a free connection before failing.
        "timeout": env_float("PANTHEON_DB_POOL_TIMEOUT", 10.0, minimum=0.1),
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
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
SPECTACULAR_SETTINGS = {"TITLE": "Pantheon API", "VERSION": "1.0.0"}

# --- Background tasks ------------------------------------------------------------------
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

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
# A running turn renews its lease (and so its hold) at least every third of this; the
# sweep closes a turn whose lease lapsed, and runs on the db_worker this often (SPEC 10).
PANTHEON_TURN_LEASE_SECONDS = env_float("PANTHEON_TURN_LEASE_SECONDS", 30.0, minimum=2)
PANTHEON_CHECKPOINT_SECONDS = env_float("PANTHEON_CHECKPOINT_SECONDS", 2.0, minimum=0.05)
# SPEC section 12: a resumable turn keeps generating this long with no client attached.
PANTHEON_RESUME_GRACE_SECONDS = env_float("PANTHEON_RESUME_GRACE_SECONDS", 30.0, minimum=0)
# SPEC section 13: wait before an estimated turn is checked against the provider's record.
PANTHEON_RECONCILE_DELAY_SECONDS = env_float("PANTHEON_RECONCILE_DELAY_SECONDS", 60.0, minimum=0)
PANTHEON_MAX_MESSAGE_CHARS = env_int("PANTHEON_MAX_MESSAGE_CHARS", 32000, minimum=1)
PANTHEON_CONTEXT_BUDGET_TOKENS = env_int("PANTHEON_CONTEXT_BUDGET_TOKENS", 8000, minimum=1)
PANTHEON_MAX_TOOL_ROUNDS = env_int("PANTHEON_MAX_TOOL_ROUNDS", 4, minimum=1)
PANTHEON_FAKE_CHUNK_DELAY_SECONDS = env_float("PANTHEON_FAKE_CHUNK_DELAY_SECONDS", 0.05)
PANTHEON_APP_URL = env_str("PANTHEON_APP_URL", "https://github.com/pantheon")
PANTHEON_APP_TITLE = env_str("PANTHEON_APP_TITLE", "Pantheon")
# Upload bodies above this stay on disk while parsed, not in memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(2_621_440, PANTHEON_MAX_UPLOAD_BYTES + 1_048_576)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("PANTHEON_LOG_LEVEL", "INFO")},
    # One line per upstream request is too much at INFO; LLM events record every call.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}
