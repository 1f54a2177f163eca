"""The billing tables' indexes, as migrated into the test database."""

import pytest
from django.db import connection

from billing.models import (
    DailyRollup,
    HourlyRollup,
    MonthlyRollup,
    PendingCommit,
    Statement,
    StatementAdjustment,
    UsageEvent,
)

# Tables where a unique constraint or an index starts with the tenant.
TENANT_LED = [UsageEvent, PendingCommit, HourlyRollup, DailyRollup, Statement, StatementAdjustment]


def _indexed_columns(model: type) -> list[list[str]]:
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, model._meta.db_table)
    return [item["columns"] for item in found.values() if item["index"] or item["unique"]]


@pytest.mark.django_db
@pytest.mark.parametrize("model", TENANT_LED, ids=lambda model: model.__name__)
def test_a_tenant_led_table_has_no_index_of_the_tenant_alone(model: type) -> None:
    columns = _indexed_columns(model)
    assert ["tenant_id"] not in columns  # one index fewer for the drain to update per row
    assert any(found[0] == "tenant_id" for found in columns)  # lookups by tenant stay indexed


@pytest.mark.django_db
def test_a_table_led_by_time_keeps_its_tenant_index() -> None:
    # Its buckets start with the month: a tenant's months need an index of their own.
    assert ["tenant_id"] in _indexed_columns(MonthlyRollup)
