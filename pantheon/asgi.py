import os

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import ImproperlyConfigured

from core import db_on_loop
from core.asgi import Lifespan, SharedThreads, no_thread_hop_at_request_start, tune_garbage_collector
from files_app.asgi import UploadSizeLimit
from llm_gateway.openrouter import aclose_shared_client
from web.asgi import ContentTypeGuard, StaticFiles

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pantheon.settings")

django_application = get_asgi_application()
no_thread_hop_at_request_start()

# pantheon.settings lets commands that need no key run without one; serving needs it, so
# a server without it stops here, at start, not at its first signed cookie.
try:
    _ = settings.SECRET_KEY  # Django raises ImproperlyConfigured for an empty key
except ImproperlyConfigured:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG=false") from None

# Static files (the chat page's JS and CSS) are served by uvicorn itself, with no CDN and
# no collectstatic step: Django's ASGIStaticFilesHandler (web.asgi.StaticFiles) answers
# requests under STATIC_URL from the staticfiles finders and hands every other request,
# untouched, to Django. It wraps at the ASGI level, so no sync middleware is added and
# streamed responses (SSE) pass straight through. A reverse proxy that serves STATIC_ROOT
# (after `manage.py collectstatic`) itself simply never reaches it.
# UploadSizeLimit answers 413 for an oversized upload before Django spools its body to disk;
# ContentTypeGuard answers 400 for a Content-Type Django would turn into a 500; SharedThreads
# runs each request's sync work on the process's database threads (core/asgi.py); Lifespan
# sets up the garbage collector when the server starts and closes the event loop's upstream
# and database connections when it stops.
application = Lifespan(UploadSizeLimit(ContentTypeGuard(SharedThreads(StaticFiles(django_application)))),
                       on_startup=[tune_garbage_collector], on_shutdown=[aclose_shared_client, db_on_loop.close])
