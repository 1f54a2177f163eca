"""Small factories for the quota model."""

from __future__ import annotations

from decimal import Decimal

import factory
from django.apps import apps as django_apps
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from limits.models import (
    AIModel,
    Budget,
    BudgetPeriod,
    FailMode,
    LimitRule,
    Metric,
    ModelClass,
    Scope,
    Tenant,
    Tier,
)
from limits.roles import role_permissions_sync


class ModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        abstract = True

    @classmethod
    def _create(cls, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        # factory_boy's own _create() takes an argument named model_class, as does our
        # quota model: hand ours over as its id.
        if "model_class" in kwargs:
            model_class = kwargs.pop("model_class")
            kwargs["model_class_id"] = model_class.pk if model_class is not None else None
        return super()._create(target, *args, **kwargs)


class TierFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tier
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"tier{n}")
    fail_mode = FailMode.CLOSED


class ModelClassFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelClass
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"class{n}")


class AIModelFactory(ModelFactory):
    class Meta:
        model = AIModel
        django_get_or_create = ("model_id",)

    model_id = factory.Sequence(lambda n: f"model-{n}")
    model_class = factory.SubFactory(ModelClassFactory)
    input_price_per_1k = Decimal("0.0025")
    output_price_per_1k = Decimal("0.0100")


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"tenant{n}")
    name = factory.LazyAttribute(lambda tenant: tenant.slug.title())
    tier = factory.SubFactory(TierFactory)


class LimitRuleFactory(ModelFactory):
    class Meta:
        model = LimitRule

    tier = factory.SubFactory(TierFactory)
    scope = Scope.USER_MODEL
    metric = Metric.REQUESTS
    window_seconds = 3600
    limit = 100


class BudgetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Budget

    tenant = factory.SubFactory(TenantFactory)
    period = BudgetPeriod.MONTH
    token_limit = 1_000_000
    is_hard = True
    alert_thresholds = [80, 100]


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", "pw")

    @factory.post_generation
    def groups(self, create: bool, extracted: list[str] | None, **kwargs: object) -> None:
        if create and extracted:
            for name in extracted:
                group = Group.objects.filter(name=name).first()
                if group is None:
                    # A transactional test before this one flushed what the data migration
                    # made; the same code puts the roles back.
                    role_permissions_sync(django_apps)
                    group = Group.objects.get(name=name)
                self.groups.add(group)
        self.save()
