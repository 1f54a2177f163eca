"""WSGI entry point (gunicorn quota_platform.wsgi)."""

from __future__ import annotations

import os
import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "quota_platform.settings")
try:
    django_application = get_wsgi_application()
except ImproperlyConfigured as error:
    # One line naming the variable, not a traceback from every worker.
    print(f"configuration error: {error}", file=sys.stderr)
    sys.exit(2)

# Imported once Django is set up: it loads the API's serializers and views.
from limits.cached_denials import CachedDenialsFront  # noqa: E402

# Checks the over-limit cache knows to be denied are answered before Django runs.
application = CachedDenialsFront(django_application)
