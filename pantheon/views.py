import threading
import time

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.shortcuts import render
from django.urls import Resolver404, resolve, reverse
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie

# Once every migration is applied, the (costlier) migration check is repeated at most this
# often; while some are pending it runs on every probe, so traffic resumes as soon as
# `migrate` is done. The database itself is probed every time.
MIGRATIONS_RECHECK_SECONDS = 10.0
_migrations_ok_at: float | None = None  # monotonic time of the last check that found none pending
_migrations_lock = threading.Lock()


def _pending_migrations(connection) -> int:
    global _migrations_ok_at
    checked = _migrations_ok_at
    if checked is not None and time.monotonic() - checked < MIGRATIONS_RECHECK_SECONDS:
        return 0
    with _migrations_lock:  # one probe builds the migration graph, the others wait for it
        checked = _migrations_ok_at
        if checked is not None and time.monotonic() - checked < MIGRATIONS_RECHECK_SECONDS:
            return 0
        executor = MigrationExecutor(connection)
        pending = len(executor.migration_plan(executor.loader.graph.leaf_nodes()))
        _migrations_ok_at = time.monotonic() if pending == 0 else None
        return pending


def health_status() -> tuple[int, dict[str, str]]:
    """Database reachable and every migration applied: 200; otherwise 503 saying which
    (a process started on code newer than its database takes no traffic until `migrate`)."""
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        pending = _pending_migrations(connection)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database is "not ok"
        return 503, {"detail": "The database is unreachable.", "code": "database_unavailable",
                     "database": f"error: {exc.__class__.__name__}", "migrations": "unknown"}
    if pending:
        return 503, {"detail": f"{pending} migration(s) not applied yet: run manage.py migrate.",
                     "code": "migrations_pending", "database": "ok", "migrations": f"{pending} unapplied"}
    return 200, {"database": "ok", "migrations": "ok"}


def healthz(request: HttpRequest) -> JsonResponse:
    status, body = health_status()
    return JsonResponse(body, status=status)


def bad_request(request: HttpRequest, exception=None) -> JsonResponse:
    # E.g. a body over DATA_UPLOAD_MAX_MEMORY_SIZE, refused before any view ran.
    return JsonResponse({"detail": "Bad request.", "code": "bad_request"}, status=400)


def permission_denied(request: HttpRequest, exception=None) -> JsonResponse:
    return JsonResponse({"detail": "Permission denied.", "code": "permission_denied"}, status=403)


def not_found(request: HttpRequest, exception=None) -> JsonResponse:
    return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"detail": "Internal server error.", "code": "server_error"}, status=500)


def method_not_allowed(request: HttpRequest, allowed: list[str]) -> JsonResponse:
    response = JsonResponse({"detail": f'Method "{request.method}" not allowed.', "code": "method_not_allowed"},
                            status=405)
    response["Allow"] = ", ".join(allowed)
    return response


@csrf_exempt  # nothing to protect: a POST to no endpoint is a 404, not a CSRF failure
async def api_not_found(request: HttpRequest) -> HttpResponse:
    """Every path under /api/ that no endpoint serves (pantheon.urls routes them all here):
    a JSON 404, with DEBUG on too (Django's debug 404 page is HTML). A GET of a page whose
    URL ends in a slash (`/api/docs`) is redirected there, as APPEND_SLASH would."""
    path = request.path_info
    if request.method in ("GET", "HEAD") and not path.endswith("/"):
        try:
            match = resolve(f"{path}/")
        except Resolver404:
            match = None
        if match is not None and match.func is not api_not_found:
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
    return not_found(request)


@ensure_csrf_cookie  # "Try it out" with the browser session sends the cookie's token (X-CSRFToken)
def api_docs(request: HttpRequest) -> HttpResponse:
    """/api/docs/: Swagger UI over /api/schema/, served from the app's static files (no CDN;
    bin/refresh-static-docs updates them)."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ["GET", "HEAD"])
    return render(request, "web/api_docs.html", {"schema_url": reverse("schema")})
