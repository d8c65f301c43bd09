"""`GET /metrics`: Prometheus' text format (or OpenMetrics, if the scraper asks for it).

Who may read it (docs/metrics.md):

- with `PANTHEON_METRICS_TOKEN` set: a request with `Authorization: Bearer <token>`, from
  anywhere (401 without the header, 403 with another token);
- without it: only a client on this machine that connected directly (a loopback address
  and no X-Forwarded-For, X-Real-IP or Forwarded header, so nothing relayed by a proxy on
  this host); everyone else gets 403.

With `PROMETHEUS_MULTIPROC_DIR` set, the process metrics are every process's that writes
into that directory (all uvicorn workers and db_workers of the host), whichever worker
answers; the database metrics are read once per scrape by the answering worker.

The rendering (the database's queries, the multiprocess files) runs on the database
threads (`core.db.db_call`), never on the event loop; a database that cannot be read makes
`pantheon_metrics_database_up` 0, never a 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client.exposition import choose_encoder

from core.db import db_call
from core.errors import error_response
from sessions_app import metrics

_PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")


def _refusal(request: HttpRequest) -> HttpResponse | None:
    token = settings.PANTHEON_METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if not given or scheme.lower() != "bearer":
            response = error_response(401, "not_authenticated", "Metrics need 'Authorization: Bearer <token>'.")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            return error_response(403, "permission_denied", "Wrong metrics token.")
        return None
    if _direct_loopback(request):
        return None
    return error_response(403, "permission_denied", "Metrics are served to this machine only; "
                          "set PANTHEON_METRICS_TOKEN to scrape them from elsewhere.")


def _direct_loopback(request: HttpRequest) -> bool:
    if any(request.META.get(name) for name in _PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "").is_loopback
    except ValueError:
        return False


_registries: dict[str | None, object] = {}


def _render(accept: str) -> tuple[bytes, str]:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    registry = _registries.get(directory)
    if registry is None:
        registry = _registries[directory] = metrics.scrape_registry(directory)
    if directory:
        metrics.forget_dead_processes(directory)
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


_render_on_database_threads = db_call(_render)


@csrf_exempt  # read-only: any other method is a 405 rather than a CSRF failure
async def metrics_view(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "method_not_allowed", f"Method {request.method!r} not allowed.")
        response["Allow"] = "GET, HEAD"
        return response
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    body, content_type = await _render_on_database_threads(request.headers.get("Accept", ""))
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
