import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pantheon.settings")

django_application = get_asgi_application()

# Static files (the chat page's JS and CSS) are served by uvicorn itself, with no CDN and
# no collectstatic step: Django's ASGIStaticFilesHandler answers requests under STATIC_URL
# from the staticfiles finders (the apps' static/ folders) and hands every other request,
# untouched, to Django. It wraps at the ASGI level, so no sync middleware is added and
# streamed responses (SSE) pass straight through. A reverse proxy that serves
# STATIC_ROOT (after `manage.py collectstatic`) itself simply never reaches it.
application = ASGIStaticFilesHandler(django_application)
