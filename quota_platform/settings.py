"""Settings for the quota platform: everything from the environment, safe local defaults.

With no DATABASE_URL and no REDIS_URL the platform runs embedded: SQLite under var/, an
in-process limiter and in-process tasks. Setting them selects the real deployment.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from quota_platform.env import (
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
    env_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set; set it (a long random string), or set DEBUG=true for a "
            "development-only default"
        )
    SECRET_KEY = "development-only-secret-key-never-use-in-production"  # noqa: S105
# A separate pepper for API key hashes lets SECRET_KEY rotate without invalidating keys.
API_KEY_PEPPER = env_str("API_KEY_PEPPER", SECRET_KEY)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "limits",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves collected static files (the admin's CSS) from gunicorn, no web server needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Checks the guarded pass-through routes (QUOTA_MIDDLEWARE) before anything else runs.
    "limits.middleware.QuotaMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "quota_platform.urls"
WSGI_APPLICATION = "quota_platform.wsgi.application"
ASGI_APPLICATION = "quota_platform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_url("DATABASE_URL", schemes=("postgres", "postgresql", "sqlite"))
if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "quota_platform.sqlite3",
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_url("REDIS_URL", schemes=("redis", "rediss", "unix"))
REDIS_CLUSTER = env_bool("REDIS_CLUSTER", False)
if REDIS_CLUSTER and not REDIS_URL:
    raise ImproperlyConfigured("REDIS_CLUSTER=true needs REDIS_URL naming one node of the cluster")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "qp-cache",
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# The limiter. Redis when REDIS_URL is set, else the in-process twin with the same rules.
QUOTA_BACKEND = "redis" if REDIS_URL else "local"
QUOTA_KEY_PREFIX = env_str("QUOTA_KEY_PREFIX", "qp")
# A Redis call slower than this counts as an outage and the tier's fail mode answers.
QUOTA_REDIS_TIMEOUT_MS = env_int("QUOTA_REDIS_TIMEOUT_MS", 50, minimum=1)
# After an outage, how long the breaker stays open before one call probes Redis again.
QUOTA_BREAKER_SECONDS = env_float("QUOTA_BREAKER_SECONDS", 1.0, minimum=0.0)
# How often a process asks Redis whether a newer policy was published.
QUOTA_POLICY_REFRESH_SECONDS = env_float("QUOTA_POLICY_REFRESH_SECONDS", 0.5, minimum=0.0)
# A concurrency slot that is never reported back frees itself after this long.
QUOTA_CONCURRENCY_LEASE_SECONDS = env_int(
    "QUOTA_CONCURRENCY_LEASE_SECONDS", 600, minimum=1, maximum=86400
)
# A check's first decision is remembered (idempotency, and to settle its usage) for its
# longest window, and at least this long.
QUOTA_REQUEST_RECORD_MIN_SECONDS = env_int(
    "QUOTA_REQUEST_RECORD_MIN_SECONDS", 3600, minimum=60, maximum=31 * 86400
)
# Off (0) unless set: a request window that Redis said is full is remembered in-process
# until it frees, at most this many seconds, and checks meeting it are denied without the
# full check (limits/overlimit.py); such a denial lists only the limit that denied. At most
# QUOTA_OVER_LIMIT_CACHE_SIZE windows per process.
QUOTA_OVER_LIMIT_CACHE_SECONDS = env_float("QUOTA_OVER_LIMIT_CACHE_SECONDS", 0.0, minimum=0.0)
QUOTA_OVER_LIMIT_CACHE_SIZE = env_int("QUOTA_OVER_LIMIT_CACHE_SIZE", 10000, minimum=1)
# How long a verified API key stays cached in-process; a revoked key dies within this.
QUOTA_API_KEY_CACHE_SECONDS = env_float("QUOTA_API_KEY_CACHE_SECONDS", 5.0, minimum=0.0)
# Which requests QuotaMiddleware checks and settles, and how it reads them (see
# limits/middleware.py): here the OpenAI-compatible pass-through routes.
QUOTA_MIDDLEWARE = {"paths": ["/v1/"]}
# The OpenAI-compatible inference server behind /v1/chat/completions, /v1/completions and
# /v1/embeddings: its base URL as OpenAI clients take it (http://host:port/v1). Unset: 503.
UPSTREAM_URL = env_url("UPSTREAM_URL", schemes=("http", "https"))
# Sent to it as "Authorization: Bearer …"; the caller's platform key never is.
UPSTREAM_API_KEY = env_str("UPSTREAM_API_KEY", "")
# How long the inference server may stay silent (before its answer, or between two chunks).
UPSTREAM_TIMEOUT_SECONDS = env_float("UPSTREAM_TIMEOUT_SECONDS", 300.0, minimum=1.0)

CELERY_BROKER_URL = (
    env_url("CELERY_BROKER_URL", schemes=("redis", "rediss", "amqp", "amqps")) or REDIS_URL
)
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
_BROKER_SCHEME = urlsplit(CELERY_BROKER_URL).scheme if CELERY_BROKER_URL else ""
if _BROKER_SCHEME in ("redis", "rediss"):
    # kombu's Redis transport, made to survive a broker restart (see quota_platform/broker.py).
    CELERY_BROKER_TRANSPORT = "quota_platform.broker:RedisTransport"
    if _BROKER_SCHEME == "rediss":
        # Named by class, the transport no longer learns TLS from the scheme: ask for it, with
        # the certificate checked, as redis-py does for the limiter's rediss:// URL.
        CELERY_BROKER_USE_SSL = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    # Puts the policy back into Redis after a FLUSHALL or a failover lost it.
    "policy-reconcile": {
        "task": "limits.tasks.policy_reconcile",
        "schedule": 10.0,
        "options": {"expires": 10},
    },
    # Usage reports kept in Postgres while Redis was away, applied once it is back.
    "deferred-usage-apply": {
        "task": "limits.tasks.deferred_usage_apply",
        "schedule": 5.0,
        "options": {"expires": 5},
    },
    # Billing: usage streams into Postgres, the top-user rollups brought up to date,
    # rollups checked against raw events, budget alerts, monthly statements and raw-event
    # retention (billing/tasks.py).
    "billing-drain": {
        "task": "billing.tasks.drain_usage",
        "schedule": 5.0,
        "options": {"expires": 5},
    },
    "billing-user-rollups": {
        "task": "billing.tasks.user_rollups",
        "schedule": 60.0,
        "options": {"expires": 60},
    },
    "billing-rollup": {
        "task": "billing.tasks.rollup",
        "schedule": 300.0,
        "options": {"expires": 300},
    },
    "billing-budget-alerts": {
        "task": "billing.tasks.budget_alerts",
        "schedule": 60.0,
        "options": {"expires": 60},
    },
    "billing-statements": {
        "task": "billing.tasks.statements_finalise",
        "schedule": 3600.0,
        "options": {"expires": 3600},
    },
    "billing-retention": {
        "task": "billing.tasks.retention",
        "schedule": 3600.0,
        "options": {"expires": 3600},
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

BILLING_CURRENCY = env_str("BILLING_CURRENCY", "USD").strip().upper()
if len(BILLING_CURRENCY) != 3 or not BILLING_CURRENCY.isalpha():
    raise ImproperlyConfigured(
        f"BILLING_CURRENCY={BILLING_CURRENCY!r} must be a three-letter ISO 4217 code"
    )
# How many usage events the drain takes from each tenant's stream per batch.
BILLING_DRAIN_BATCH = env_int("BILLING_DRAIN_BATCH", 2000, minimum=1, maximum=100_000)
# A batch a drain read but never acknowledged (its process died) is taken over after this.
BILLING_CLAIM_IDLE_SECONDS = env_float("BILLING_CLAIM_IDLE_SECONDS", 60.0, minimum=0.0)
# Raw usage events older than this are deleted once rolled up (rollups are kept). Longer
# than a request record lives, so a late commit still finds its check.
BILLING_RAW_RETENTION_DAYS = env_int("BILLING_RAW_RETENTION_DAYS", 35, minimum=2, maximum=3660)
# A month's statements are finalised this long after the month ends; later usage of that
# month lands on the next statement as an adjustment.
BILLING_STATEMENT_GRACE_HOURS = env_int(
    "BILLING_STATEMENT_GRACE_HOURS", 24, minimum=0, maximum=24 * 28
)
# Who gets budget alerts; empty: the active members of the finance group and superusers.
BILLING_ALERT_EMAILS = env_list("BILLING_ALERT_EMAILS", [])

# Mail (budget alerts). Without EMAIL_HOST mail is written to the log instead of sent.
EMAIL_HOST = env_str("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "quota-platform@localhost")

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Compressed but not hashed: a manifest would make every page fail until collectstatic ran,
# which tests and fresh checkouts never do.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGIN_URL = "admin:login"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["limits.parsers.BoundedJSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "limits.views.api_exception_handler",
}
# Check bodies are a few hundred bytes; anything near this is a mistake or an attack.
QUOTA_API_MAX_BODY_BYTES = env_int("QUOTA_API_MAX_BODY_BYTES", 64 * 1024, minimum=1024)

SPECTACULAR_SETTINGS = {
    "TITLE": "Quota platform API",
    "DESCRIPTION": "Ask before each inference; report what it really used.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
    # Django logs every 4xx answer as a warning. gunicorn's access log already has each
    # request with its status, and a flood of bad keys would otherwise also cost a
    # formatted warning apiece; server errors are still logged with their traceback.
    "loggers": {"django.request": {"level": "ERROR"}},
}
