"""Settings of the HTTP benchmark's server: the project's own, plus the baseline route."""

from __future__ import annotations

from quota_platform.settings import *  # noqa: F403

ROOT_URLCONF = "bench.http_urls"
