"""The single-column tenant index goes from the tables where a unique constraint or an index
already starts with the tenant (the usage events, their pending commits, the hourly and daily
rollups, statements and their adjustments): that one serves lookups by tenant, and the drain
no longer updates a second index for every row it writes. On PostgreSQL this drops six
indexes and rewrites no table (SQLite remakes each table, as for any altered field);
migrating back builds them again."""

import django.db.models.deletion
from django.db import migrations, models

TABLES = [
    "dailyrollup",
    "hourlyrollup",
    "pendingcommit",
    "statement",
    "statementadjustment",
    "usageevent",
]


def _tenant_without_index() -> models.ForeignKey:
    # A field of its own for each model: a migration's state binds it to its model.
    return models.ForeignKey(
        db_constraint=False,
        db_index=False,
        on_delete=django.db.models.deletion.DO_NOTHING,
        related_name="+",
        to="limits.tenant",
    )


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0007_users_folded_position"),
        ("limits", "0005_deferredusagereport_lost_answer"),
    ]

    operations = [
        migrations.AlterField(model_name=table, name="tenant", field=_tenant_without_index())
        for table in TABLES
    ]
