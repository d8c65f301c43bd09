from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse


def health_status() -> tuple[int, dict[str, str]]:
    """Database reachable and every migration applied: 200; otherwise 503 saying which."""
    body = {"database": "ok", "migrations": "ok"}
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database is "not ok"
        return 503, {"database": f"error: {exc.__class__.__name__}", "migrations": "unknown"}
    if plan:
        body["migrations"] = f"{len(plan)} unapplied"
        return 503, body
    return 200, body


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
