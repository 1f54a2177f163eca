"""The single-column tenant index goes from the tables where a unique constraint or an index
already starts with the tenant (the usage events, their pending commits, the hourly and daily
rollups, statements and their adjustments): that one serves lookups by tenant, and the drain
no longer updates a second index for every row it writes. On PostgreSQL this drops six
indexes and rewrites no table (SQLite remakes each table, as for any altered field);
migrating back builds them again."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0007_users_folded_position"),
        ("limits", "0005_deferredusagereport_lost_answer"),
    ]

    operations = [
        migrations.AlterField(
            model_name="dailyrollup",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
        migrations.AlterField(
            model_name="hourlyrollup",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
        migrations.AlterField(
            model_name="pendingcommit",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
        migrations.AlterField(
            model_name="statement",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
        migrations.AlterField(
            model_name="statementadjustment",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="tenant",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="limits.tenant",
            ),
        ),
    ]
