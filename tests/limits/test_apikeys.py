from __future__ import annotations

import hmac
import os
import re
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from limits import apikeys
from limits.apikeys import (
    BASE62_ALPHABET,
    apikey_authenticate,
    apikey_parse,
    apikey_secret_hash,
)
from limits.models import ApiKey, AuditEntry
from limits.services import SYSTEM, Actor, apikey_create, apikey_revoke
from tests.factories import UserFactory

KEY_FORMAT = re.compile(r"^qk_[a-z2-7]{8}_[0-9A-Za-z]{32}[0-9A-Za-z]{6}$")


def _secret_of(key: str) -> str:
    parsed = apikey_parse(key)
    assert parsed is not None
    return parsed.secret


def _change_one_character(key: str, position: int) -> str:
    original = key[position]
    replacement = next(c for c in BASE62_ALPHABET if c != original and c.islower())
    return key[:position] + replacement + key[position + 1 :]


# Format and checksum


def test_a_new_key_has_the_documented_format(world):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    assert KEY_FORMAT.match(key)
    assert key.startswith(f"qk_{api_key.prefix}_")
    assert len(key) == 3 + 8 + 1 + 32 + 6


def test_the_stored_hash_is_the_hmac_of_the_secret_with_the_pepper(world, settings):
    settings.API_KEY_PEPPER = "pepper-for-this-test"
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    expected = hmac.new(b"pepper-for-this-test", _secret_of(key).encode(), "sha256").hexdigest()
    api_key.refresh_from_db()
    assert api_key.secret_hash == expected
    assert apikey_secret_hash(_secret_of(key)) == expected


def test_two_keys_differ_in_prefix_and_secret(world):
    first_key, first = apikey_create(tenant=world.alice, name="one", actor=SYSTEM)
    second_key, second = apikey_create(tenant=world.alice, name="two", actor=SYSTEM)

    assert first_key.prefix != second_key.prefix
    assert _secret_of(first) != _secret_of(second)


def test_a_well_formed_key_parses_into_prefix_and_secret():
    generated = apikeys.apikey_generate()

    parsed = apikey_parse(generated.key)

    assert parsed == apikeys.ParsedKey(prefix=generated.prefix, secret=generated.key[12:44])


@pytest.mark.parametrize("position", [3, 7, 12, 30, 43, 44, 49])
def test_a_key_with_one_character_changed_is_rejected_without_a_query(
    world, django_assert_num_queries, position
):
    _api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    mistyped = _change_one_character(key, position)
    assert mistyped != key

    with django_assert_num_queries(0):
        assert apikey_parse(mistyped) is None
        assert apikey_authenticate(mistyped) is None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "qk_",
        "Bearer qk_abcdefgh_" + "a" * 38,
        "qk_ABCDEFGH_" + "a" * 38,
        "qk_abcdefgh_" + "a" * 37,
        "qk_abcdefgh_" + "a" * 39,
        "sk_abcdefgh_" + "a" * 38,
        "qk_abcdefgh_" + "a" * 32 + "!!!!!!",
        "qk_abcdefgh_" + "ａ" * 38,
    ],
)
def test_malformed_keys_are_rejected_without_a_query(db, django_assert_num_queries, raw):
    with django_assert_num_queries(0):
        assert apikey_authenticate(raw) is None


def test_a_forged_key_with_a_valid_looking_body_and_wrong_checksum_costs_no_query(
    db, django_assert_num_queries
):
    forged = "qk_abcdefgh_" + "A" * 32 + "000000"

    with django_assert_num_queries(0):
        assert apikey_authenticate(forged) is None


# Authentication


def test_a_valid_key_authenticates_with_its_tenant_and_tier_loaded(
    world, django_assert_num_queries
):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    with django_assert_num_queries(2):  # the lookup, then the first last-used update
        found = apikey_authenticate(key)
    assert found is not None
    assert found.pk == api_key.pk
    with django_assert_num_queries(0):
        assert found.tenant.slug == "alice"
        assert found.tenant.tier.name == "standard"


def test_surrounding_white_space_is_ignored(world):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    found = apikey_authenticate(f"  {key}\n")

    assert found is not None
    assert found.pk == api_key.pk


def test_the_right_prefix_with_a_wrong_secret_is_rejected(world):
    api_key, _key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    body = f"qk_{api_key.prefix}_{'B' * 32}"
    # A correct checksum, so the key reaches the database and is refused by the hash.
    wrong_secret = body + apikeys._checksum(body)

    assert apikey_parse(wrong_secret) is not None
    assert apikey_authenticate(wrong_secret) is None


def test_an_unknown_prefix_is_rejected(world):
    body = f"qk_zzzzzzzz_{'C' * 32}"

    assert apikey_authenticate(body + apikeys._checksum(body)) is None


def test_the_hashes_are_compared_in_constant_time(world, monkeypatch):
    _api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    compared: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def recording_compare_digest(left, right):
        compared.append((left, right))
        return original(left, right)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", recording_compare_digest)

    assert apikey_authenticate(key) is not None
    stored = ApiKey.objects.get().secret_hash
    assert (stored, apikey_secret_hash(_secret_of(key))) in compared


def test_a_revoked_key_is_rejected(world):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    apikey_revoke(api_key=api_key, actor=SYSTEM)

    assert apikey_authenticate(key) is None


def test_a_key_of_an_inactive_tenant_is_rejected(world):
    _api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    world.alice.is_active = False
    world.alice.save()

    assert apikey_authenticate(key) is None


def test_a_key_of_one_tenant_never_authenticates_as_the_other(world):
    _alice_key, alice = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    _bob_key, bob = apikey_create(tenant=world.bob, name="backend", actor=SYSTEM)

    assert apikey_authenticate(alice).tenant.slug == "alice"
    assert apikey_authenticate(bob).tenant.slug == "bob"


def test_a_changed_pepper_invalidates_existing_keys(world, settings):
    _api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    settings.API_KEY_PEPPER = "a-different-pepper"

    assert apikey_authenticate(key) is None


# Last use


def test_last_used_is_recorded_at_most_once_a_minute(world, django_assert_num_queries):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    assert api_key.last_used_at is None

    apikey_authenticate(key)
    api_key.refresh_from_db()
    first_use = api_key.last_used_at
    assert first_use is not None

    with django_assert_num_queries(1):  # the lookup only: no update within the minute
        apikey_authenticate(key)
    api_key.refresh_from_db()
    assert api_key.last_used_at == first_use


def test_last_used_is_recorded_again_after_a_minute(world, django_assert_num_queries):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=an_hour_ago)

    with django_assert_num_queries(2):
        apikey_authenticate(key)
    api_key.refresh_from_db()
    assert api_key.last_used_at > an_hour_ago + timedelta(minutes=59)


def test_a_rejected_key_records_no_use(world):
    api_key, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    apikey_revoke(api_key=api_key, actor=SYSTEM)

    apikey_authenticate(key)

    api_key.refresh_from_db()
    assert api_key.last_used_at is None


# Create and revoke


def test_creating_a_key_records_who_and_audits_without_secret_or_hash(world):
    olivia = UserFactory(username="olivia", groups=["operators"])

    api_key, key = apikey_create(
        tenant=world.alice, name="  backend  ", actor=Actor.from_user(olivia)
    )

    api_key.refresh_from_db()
    assert api_key.name == "backend"
    assert api_key.created_by == olivia
    entry = AuditEntry.objects.get(target_type="apikey")
    assert entry.action == "created"
    assert entry.actor_label == "olivia"
    assert entry.parent_type == "tenant"
    assert entry.parent_id == str(world.alice.pk)
    assert entry.changes == {
        "tenant": [None, "alice"],
        "name": [None, "backend"],
        "prefix": [None, api_key.prefix],
    }
    assert _secret_of(key) not in str(entry.changes)
    assert api_key.secret_hash not in str(entry.changes)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Give the key a name (1 to 100 characters)."),
        ("   ", "Give the key a name (1 to 100 characters)."),
        ("x" * 101, "The name must be at most 100 characters."),
        ("tab\there", "The name must contain only printable characters."),
    ],
)
def test_a_bad_name_is_refused_and_nothing_is_written(world, name, message):
    with pytest.raises(ValidationError) as raised:
        apikey_create(tenant=world.alice, name=name, actor=SYSTEM)

    assert raised.value.message_dict == {"name": [message]}
    assert ApiKey.objects.count() == 0
    assert AuditEntry.objects.filter(target_type="apikey").count() == 0


def test_a_name_of_exactly_100_characters_is_accepted(world):
    api_key, _key = apikey_create(tenant=world.alice, name="n" * 100, actor=SYSTEM)

    assert api_key.name == "n" * 100


def test_revoking_sets_the_time_and_audits_once(world):
    api_key, _key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)

    apikey_revoke(api_key=api_key, actor=SYSTEM)
    revoked_at = api_key.revoked_at
    apikey_revoke(api_key=api_key, actor=SYSTEM)

    api_key.refresh_from_db()
    assert revoked_at is not None
    assert api_key.revoked_at == revoked_at
    revocations = AuditEntry.objects.filter(target_type="apikey", action="revoked")
    assert revocations.count() == 1
    assert revocations.get().changes == {"revoked_at": [None, revoked_at.isoformat()]}


def test_revoking_a_stale_copy_of_a_revoked_key_keeps_the_first_time(world):
    api_key, _key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    stale_copy = ApiKey.objects.get(pk=api_key.pk)
    apikey_revoke(api_key=api_key, actor=SYSTEM)

    apikey_revoke(api_key=stale_copy, actor=SYSTEM)

    assert stale_copy.revoked_at == api_key.revoked_at
    assert AuditEntry.objects.filter(action="revoked").count() == 1


# No secret anywhere in the database


def _text_columns() -> list[tuple[str, str]]:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.table_name, c.column_name
            FROM information_schema.columns c
            JOIN information_schema.tables t
              ON t.table_schema = c.table_schema AND t.table_name = c.table_name
            WHERE c.table_schema = current_schema()
              AND t.table_type = 'BASE TABLE'
              AND c.data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')
            ORDER BY c.table_name, c.column_name
            """
        )
        return list(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_no_key_secret_appears_anywhere_in_the_database(world, settings):
    operator = UserFactory(username="olivia", groups=["operators"])
    keys = [
        apikey_create(tenant=world.alice, name="backend", actor=SYSTEM),
        apikey_create(tenant=world.alice, name="batch jobs", actor=Actor.from_user(operator)),
        apikey_create(tenant=world.bob, name="backend", actor=SYSTEM),
    ]
    apikey_revoke(api_key=keys[0][0], actor=SYSTEM)
    out = StringIO()
    call_command("createapikey", "bob", "--name", "cli", stdout=out)
    secrets = [_secret_of(key) for _api_key, key in keys]
    secrets.append(_secret_of(out.getvalue().splitlines()[-1]))

    columns = _text_columns()
    tables = {table for table, _column in columns}
    assert {"limits_apikey", "limits_auditentry", "limits_policyversion"} <= tables

    audit_rows = 0
    with connection.cursor() as cursor:
        for table, column in columns:
            cursor.execute(
                f'SELECT "{column}"::text FROM "{table}" WHERE "{column}" IS NOT NULL'  # noqa: S608
            )
            for (value,) in cursor.fetchall():
                audit_rows += table == "limits_auditentry"
                for secret in secrets:
                    assert secret not in value, f"a key secret is stored in {table}.{column}"
    assert audit_rows > 0
    # The hashes live in the key table only, never in the audit trail.
    audit_text = str(list(AuditEntry.objects.values_list("changes", flat=True)))
    for api_key, _key in keys:
        api_key.refresh_from_db()
        assert api_key.secret_hash not in audit_text


# createapikey


def test_createapikey_prints_a_key_that_authenticates_as_its_last_line(world):
    out = StringIO()

    call_command("createapikey", "  ALICE ", "--name", "ingest", stdout=out)

    lines = out.getvalue().splitlines()
    key = lines[-1]
    assert KEY_FORMAT.match(key)
    api_key = apikey_authenticate(key)
    assert api_key is not None
    assert api_key.tenant.slug == "alice"
    assert api_key.name == "ingest"
    assert lines[:-1] == [
        f"Created API key 'ingest' for tenant alice (prefix {api_key.prefix}). "
        "Store it now; it cannot be shown again:"
    ]
    assert AuditEntry.objects.get(target_type="apikey").actor_label == "createapikey"


def test_createapikey_with_an_unknown_tenant_names_it_and_creates_nothing(world):
    with pytest.raises(CommandError, match="no tenant with slug 'nobody'"):
        call_command("createapikey", "Nobody", "--name", "ingest", stdout=StringIO())

    assert ApiKey.objects.count() == 0


def test_createapikey_with_a_bad_name_says_why(world):
    with pytest.raises(CommandError, match="The name must be at most 100 characters."):
        call_command("createapikey", "alice", "--name", "x" * 101, stdout=StringIO())

    assert ApiKey.objects.count() == 0


def _manage(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run manage.py as an operator would, against this test's database."""
    database = django_settings.DATABASES["default"]
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL"}
    }
    environ["DATABASE_URL"] = (
        f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    )
    environ["API_KEY_PEPPER"] = django_settings.API_KEY_PEPPER
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=django_settings.BASE_DIR,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_createapikey_on_the_command_line_ends_with_the_key_and_exits_zero(world):
    result = _manage("createapikey", "alice", "--name", "from the shell")

    assert result.returncode == 0, result.stderr
    key = result.stdout.splitlines()[-1]
    api_key = apikey_authenticate(key)
    assert api_key is not None
    assert api_key.name == "from the shell"


@pytest.mark.django_db(transaction=True)
def test_createapikey_on_the_command_line_with_an_unknown_tenant_exits_non_zero(world):
    result = _manage("createapikey", "nobody", "--name", "x")

    assert result.returncode != 0
    assert "no tenant with slug 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert ApiKey.objects.count() == 0
