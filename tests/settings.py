"""Settings of the test run: pantheon.settings, in an environment that lets it load.

DEBUG is off by default (as in production), and then pantheon.settings requires a
DJANGO_SECRET_KEY: the test run supplies one, and readable text logs, unless the caller's
environment says otherwise. They are set in os.environ, so the subprocesses that tests
start (uvicorn, db_worker, manage.py) inherit them along with DJANGO_SETTINGS_MODULE.
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "pantheon-tests-only-" + "k3y-n0t-a-s3cret-" * 3)
os.environ.setdefault("PANTHEON_LOG_FORMAT", "text")

from pantheon.settings import *  # noqa: E402,F403
