"""Quota platform: quotas, limits and usage billing for AI inference."""

from __future__ import annotations

from quota_platform.celery_app import app as celery_app

__all__ = ["celery_app"]
