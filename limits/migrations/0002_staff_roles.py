from django.db import migrations


def create_roles(apps, schema_editor):
    from limits.roles import role_permissions_sync

    role_permissions_sync(apps)


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=["operators", "finance"]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("limits", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
