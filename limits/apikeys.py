"""API keys in the GitHub/Stripe style: ``qk_<prefix>_<secret><checksum>``.

- ``prefix``: 8 lowercase base32 characters, public, unique; the database looks keys up by it.
- ``secret``: 32 base62 characters from ``secrets`` (about 190 bits); only its keyed hash
  (HMAC-SHA256 with ``settings.API_KEY_PEPPER``) is stored.
- ``checksum``: CRC32 of everything before it, 6 base62 characters, so a mistyped or made-up
  key is turned away without touching the database, and secret scanners can tell real keys
  from noise.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Q
from django.utils import timezone

from limits.models import ApiKey

KEY_PREFIX = "qk_"
PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
BASE62_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6
NAME_MAX_LENGTH = 100
# Recording every use would turn each check into a write; once a minute is enough to see
# which keys are alive.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_KEY = re.compile(
    rf"^{KEY_PREFIX}(?P<prefix>[{PREFIX_ALPHABET}]{{{PREFIX_LENGTH}}})_"
    rf"(?P<secret>[0-9A-Za-z]{{{SECRET_LENGTH}}})(?P<checksum>[0-9A-Za-z]{{{CHECKSUM_LENGTH}}})$"
)
_KEY_LENGTH = len(KEY_PREFIX) + PREFIX_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH


@dataclass(frozen=True)
class ParsedKey:
    """A key whose format and checksum are right; says nothing yet about the database."""

    prefix: str
    secret: str


@dataclass(frozen=True)
class GeneratedKey:
    """A new key: the full string to hand out once, and what the database keeps."""

    prefix: str
    secret_hash: str
    key: str

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"GeneratedKey(prefix={self.prefix!r})"


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(BASE62_ALPHABET[remainder])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def apikey_secret_hash(secret: str) -> str:
    """The keyed hash stored for a secret: a leaked table cannot be brute-forced offline
    without the pepper, which lives outside the database."""
    pepper = settings.API_KEY_PEPPER.encode("utf-8")
    return hmac.new(pepper, secret.encode("ascii"), hashlib.sha256).hexdigest()


def apikey_generate() -> GeneratedKey:
    prefix = "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = "".join(secrets.choice(BASE62_ALPHABET) for _ in range(SECRET_LENGTH))
    body = f"{KEY_PREFIX}{prefix}_{secret}"
    return GeneratedKey(
        prefix=prefix, secret_hash=apikey_secret_hash(secret), key=body + _checksum(body)
    )


def apikey_parse(raw: str) -> ParsedKey | None:
    """Check a presented key's format and checksum, without the database."""
    if not isinstance(raw, str):
        return None
    raw = raw.strip()
    if len(raw) != _KEY_LENGTH:
        return None
    match = _KEY.match(raw)
    if match is None:
        return None
    if not hmac.compare_digest(_checksum(raw[:-CHECKSUM_LENGTH]), match["checksum"]):
        return None
    return ParsedKey(prefix=match["prefix"], secret=match["secret"])


def apikey_name_clean(name: str) -> str:
    """A key's name: 1 to 100 printable characters, surrounding white space trimmed."""
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise ValidationError({"name": "Give the key a name (1 to 100 characters)."})
    if len(cleaned) > NAME_MAX_LENGTH:
        raise ValidationError({"name": f"The name must be at most {NAME_MAX_LENGTH} characters."})
    if not cleaned.isprintable():
        raise ValidationError({"name": "The name must contain only printable characters."})
    return cleaned


def apikey_authenticate(raw: str) -> ApiKey | None:
    """The active key ``raw`` stands for, with its tenant and tier loaded, or None.

    Costs nothing for a malformed key, one SELECT for a well-formed one, and one UPDATE at
    most once a minute per key to record its last use.
    """
    parsed = apikey_parse(raw)
    if parsed is None:
        return None
    presented_hash = apikey_secret_hash(parsed.secret)
    api_key = (
        ApiKey.objects.select_related("tenant", "tenant__tier").filter(prefix=parsed.prefix).first()
    )
    if api_key is None:
        return None
    if not hmac.compare_digest(api_key.secret_hash, presented_hash):
        return None
    if api_key.revoked_at is not None or not api_key.tenant.is_active:
        return None
    _last_used_touch(api_key)
    return api_key


def _last_used_touch(api_key: ApiKey) -> None:
    now = timezone.now()
    stale_before = now - LAST_USED_RESOLUTION
    if api_key.last_used_at is not None and api_key.last_used_at > stale_before:
        return
    # The condition is repeated in SQL so that processes racing on the same key write once.
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lte=stale_before), pk=api_key.pk
    ).update(last_used_at=now)
    api_key.last_used_at = now
