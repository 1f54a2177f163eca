"""WSGI entry point (gunicorn quota_platform.wsgi)."""

from __future__ import annotations

import os
import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "quota_platform.settings")
try:
    application = get_wsgi_application()
except ImproperlyConfigured as error:
    # One line naming the variable, not a traceback from every worker.
    print(f"configuration error: {error}", file=sys.stderr)
    sys.exit(2)
