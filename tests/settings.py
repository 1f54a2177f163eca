"""Test settings: the real settings, pointed at the real local PostgreSQL and Redis."""

from __future__ import annotations

import os

os.environ.setdefault("DEBUG", "false")
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quota_platform")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")

from quota_platform.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A database of each run's own, so that runs side by side (and xdist workers, which add
# their own suffix) never drop each other's test database.
DATABASES["default"]["TEST"] = {"NAME": f"test_quota_platform_{os.getpid()}"}  # noqa: F405
