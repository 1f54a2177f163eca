"""Writes to the quota model. Admin, policy files and commands all come through here, so an
edit behaves the same wherever it is made: validated, audited, and published on commit.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction

from limits.models import (
    AIModel,
    ApiKey,
    AuditEntry,
    Budget,
    LimitRule,
    ModelClass,
    PolicyVersion,
    Tenant,
    Tier,
)

AUDITED_MODELS: tuple[type[models.Model], ...] = (
    Tier,
    ModelClass,
    AIModel,
    Tenant,
    LimitRule,
    Budget,
    ApiKey,
)
_IGNORED_FIELDS = {"id", "created_at", "updated_at", "last_used_at", "secret_hash"}


@dataclass(frozen=True)
class Actor:
    """Who made a change: a user (admin) or a named process (loadpolicy, a task)."""

    label: str
    user: AbstractBaseUser | None = None

    @classmethod
    def from_user(cls, user: AbstractBaseUser | AnonymousUser | None) -> Actor:
        if user is None or not user.is_authenticated:
            return cls(label="anonymous")
        return cls(label=user.get_username(), user=user)  # type: ignore[arg-type]


SYSTEM = Actor(label="system")

_batch = threading.local()


def _json_value(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, models.Model):
        return str(value)
    return value


def _snapshot(instance: models.Model) -> dict[str, object]:
    values: dict[str, object] = {}
    for field in instance._meta.concrete_fields:
        if field.name in _IGNORED_FIELDS:
            continue
        if field.is_relation:
            related_id = getattr(instance, field.attname)
            values[field.name] = (
                str(getattr(instance, field.name)) if related_id is not None else None
            )
        else:
            values[field.name] = _json_value(getattr(instance, field.attname))
    return values


def _parent_of(instance: models.Model) -> tuple[str, str]:
    for attribute in ("tenant", "tier", "model_class"):
        parent_id = getattr(instance, f"{attribute}_id", None)
        if parent_id is not None:
            parent_type = attribute.replace("_", "")
            return parent_type, str(parent_id)
    return "", ""


def audit_record(
    *,
    actor: Actor,
    action: str,
    instance: models.Model,
    changes: dict[str, Any],
    policy_version: int | None = None,
) -> AuditEntry:
    """Record one change. Without ``policy_version`` the next publish stamps the entry with
    the version that first enforces it."""
    parent_type, parent_id = _parent_of(instance)
    return AuditEntry.objects.create(
        actor=actor.user,
        actor_label=actor.label[:150],
        action=action,
        target_type=instance._meta.model_name or "",
        target_id=str(instance.pk),
        target_repr=str(instance)[:300],
        parent_type=parent_type,
        parent_id=parent_id,
        changes=changes,
        policy_version=policy_version,
    )


def object_save(*, instance: models.Model, actor: Actor, validate: bool = True) -> bool:
    """Validate, save and audit one object of the quota model; publish after commit.

    Returns whether anything changed. Saving an object equal to what is stored writes
    nothing, so loading the same policy twice leaves no trace.
    """
    if validate:
        instance.full_clean()
    with transaction.atomic():
        previous = None
        if instance.pk is not None:
            previous = type(instance).objects.select_for_update().filter(pk=instance.pk).first()
        new_values = _snapshot(instance)
        if previous is None:
            instance.save()
            audit_record(
                actor=actor,
                action=AuditEntry.Action.CREATED,
                instance=instance,
                changes={name: [None, value] for name, value in new_values.items()},
            )
        else:
            old_values = _snapshot(previous)
            changes = {
                name: [old_values[name], value]
                for name, value in new_values.items()
                if old_values[name] != value
            }
            if not changes:
                return False
            instance.save()
            audit_record(
                actor=actor, action=AuditEntry.Action.CHANGED, instance=instance, changes=changes
            )
        if isinstance(instance, AIModel):
            # Billing prices usage as it was when it happened: keep the price history.
            from billing.services import model_price_record

            model_price_record(model=instance, previous=previous)
        policy_publish_on_commit(actor=actor, reason=f"{instance._meta.verbose_name} saved")
    return True


def object_delete(*, instance: models.Model, actor: Actor) -> None:
    with transaction.atomic():
        old_values = _snapshot(instance)
        audit_record(
            actor=actor,
            action=AuditEntry.Action.DELETED,
            instance=instance,
            changes={name: [value, None] for name, value in old_values.items()},
        )
        instance.delete()
        policy_publish_on_commit(actor=actor, reason=f"{instance._meta.verbose_name} deleted")


@contextmanager
def policy_batch(*, actor: Actor, reason: str) -> Iterator[None]:
    """Group many edits into one transaction and at most one publish."""
    depth = getattr(_batch, "depth", 0)
    _batch.depth = depth + 1
    try:
        with transaction.atomic():
            yield
            if depth == 0:
                _batch.depth = 0
                policy_publish_on_commit(actor=actor, reason=reason)
    finally:
        _batch.depth = depth


@contextmanager
def _publish_held() -> Iterator[None]:
    """Edits inside publish nothing themselves; the caller publishes once, itself."""
    depth = getattr(_batch, "depth", 0)
    _batch.depth = depth + 1
    try:
        yield
    finally:
        _batch.depth = depth


def policy_publish_on_commit(*, actor: Actor, reason: str) -> None:
    if getattr(_batch, "depth", 0):
        return
    transaction.on_commit(lambda: policy_publish(actor=actor, reason=reason))


def policy_publish(
    *,
    actor: Actor,
    reason: str,
    force: bool = False,
    restores: PolicyVersion | None = None,
) -> PolicyVersion | None:
    """Compile the whole policy and record it as a new version when it differs from the
    latest one (or ``force``), then hand it to the enforcement layer.

    Returns the new version, or None when nothing changed.
    """
    from limits.policy import policy_compile, policy_push

    for _attempt in range(5):
        document = policy_compile()
        latest = PolicyVersion.objects.order_by("-version").first()
        if latest is not None and not force and _same_policy(latest.document, document):
            return None
        number = (latest.version if latest else 0) + 1
        document["version"] = number
        try:
            with transaction.atomic():
                version = PolicyVersion.objects.create(
                    version=number,
                    created_by=actor.user,
                    actor_label=actor.label[:150],
                    reason=reason[:500],
                    restores=restores,
                    document=document,
                )
                AuditEntry.objects.filter(policy_version__isnull=True).update(policy_version=number)
        except IntegrityError:
            continue  # another process published the same number first; compile again
        transaction.on_commit(functools.partial(policy_push, version=version))
        return version
    raise RuntimeError("could not allocate a policy version after 5 attempts")


class RollbackRefused(Exception):
    """A rollback that was not made; the message says why in plain words. Nothing changed."""


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback did: the version it published (None when the database already held
    what ``target`` holds), one line per object changed, and what it left as it is."""

    target: PolicyVersion
    published: PolicyVersion | None
    changes: list[str]
    left_alone: list[str]


class _NothingToRestore(Exception):
    """Leaves the rollback's transaction without a publish: the database already matches."""


def policy_rollback(*, version: PolicyVersion, actor: Actor) -> RollbackResult:
    """Make the database hold what ``version`` holds and publish that as a new version.

    The version's document becomes a policy file's data and is loaded exactly as
    ``loadpolicy`` loads one (validated, every object audited, one transaction), then
    published once with ``restores`` pointing at ``version``; one more audit entry says who
    rolled back to which version. Raises ``RollbackRefused`` (nothing changed) for the
    version already in force or a document that cannot be restored.
    """
    from limits.policyfile import PolicyFileError, policy_apply, policy_validate
    from limits.selectors import UnreadableDocument, policy_restore_for

    latest = PolicyVersion.objects.order_by("-version").only("version").first()
    if latest is None or latest.version == version.version:
        raise RollbackRefused(
            f"v{version.version} is the policy in force already; there is nothing to roll back."
        )
    try:
        restore = policy_restore_for(version=version)
    except UnreadableDocument as error:
        raise RollbackRefused(
            f"v{version.version} cannot be restored: {error}. Nothing was changed."
        ) from None
    reason = f"rollback to v{version.version}"
    try:
        plan = policy_validate(restore.data)
        # The changes, their audit and the new version commit together: the version is
        # recorded inside this transaction (pushed to the engine on commit), so the rollback
        # can answer with the version it published.
        with transaction.atomic():
            with _publish_held():
                result = policy_apply(plan=plan, actor=actor, reason=reason)
                if result.is_unchanged:
                    raise _NothingToRestore
                audit_record(
                    actor=actor,
                    action=AuditEntry.Action.ROLLED_BACK,
                    instance=version,
                    changes={"policy": [f"v{latest.version}", f"v{version.version}"]},
                )
            published = policy_publish(actor=actor, reason=reason, restores=version)
    except _NothingToRestore:
        return RollbackResult(
            target=version, published=None, changes=[], left_alone=restore.left_alone
        )
    except PolicyFileError as error:
        raise RollbackRefused(
            f"v{version.version} cannot be restored, nothing was changed: "
            + "; ".join(error.problems)
        ) from None
    return RollbackResult(
        target=version,
        published=published,
        changes=result.lines(),
        left_alone=restore.left_alone,
    )


def _same_policy(left: dict[str, Any], right: dict[str, Any]) -> bool:
    strip = {"version"}
    return {k: v for k, v in left.items() if k not in strip} == {
        k: v for k, v in right.items() if k not in strip
    }


def apikey_create(*, tenant: Tenant, name: str, actor: Actor) -> tuple[ApiKey, str]:
    """Create a key for ``tenant``; returns it with the full key string, the only time that
    string exists anywhere. The audit row names the key but holds neither secret nor hash."""
    from limits.apikeys import apikey_generate, apikey_name_clean

    name = apikey_name_clean(name)
    for attempt in range(5):
        generated = apikey_generate()
        api_key = ApiKey(
            tenant=tenant,
            name=name,
            prefix=generated.prefix,
            secret_hash=generated.secret_hash,
            created_by=actor.user,
        )
        try:
            with transaction.atomic():
                api_key.save(force_insert=True)
                audit_record(
                    actor=actor,
                    action=AuditEntry.Action.CREATED,
                    instance=api_key,
                    changes={
                        "tenant": [None, str(tenant)],
                        "name": [None, name],
                        "prefix": [None, api_key.prefix],
                    },
                )
        except IntegrityError:
            # 40 random bits of prefix rarely collide; when they do, draw again.
            if attempt == 4 or not ApiKey.objects.filter(prefix=generated.prefix).exists():
                raise
            continue
        return api_key, generated.key
    raise AssertionError("unreachable")


def apikey_revoke(*, api_key: ApiKey, actor: Actor) -> None:
    """Revoke a key for good; revoking it again changes and records nothing."""
    from django.utils import timezone

    now = timezone.now()
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
            revoked_at=now
        )
        if revoked:
            api_key.revoked_at = now
            audit_record(
                actor=actor,
                action=AuditEntry.Action.REVOKED,
                instance=api_key,
                changes={"revoked_at": [None, now.isoformat()]},
            )
        else:
            api_key.revoked_at = (
                ApiKey.objects.filter(pk=api_key.pk).values_list("revoked_at", flat=True).first()
            )


def user_reset(*, tenant: Tenant, user_id: str, model_id: str | None = None, actor: Actor) -> int:
    """Clear one end user's windows and concurrency leases in ``tenant``, on every model or
    on one, and audit it on the tenant. Returns how many keys were removed.

    Raises ``ValidationError`` for an empty user id or an unknown model, and
    ``limits.engine.EngineUnavailable`` when the limiter's store cannot be reached (then
    nothing was reset and nothing is recorded).
    """
    from limits import engine

    if not user_id or not user_id.strip():
        raise ValidationError({"user_id": "Enter the end user's id as the service sends it."})
    if model_id is not None and not AIModel.objects.filter(model_id=model_id).exists():
        raise ValidationError({"model_id": f"There is no model {model_id!r}."})
    # The reset cannot be undone, so it goes first: when the store is unreachable nothing
    # happened and nothing is recorded.
    removed = engine.reset(tenant.pk, user_id, model_id)
    latest = PolicyVersion.objects.order_by("-version").values_list("version", flat=True).first()
    audit_record(
        actor=actor,
        action=AuditEntry.Action.RESET,
        instance=tenant,
        changes={
            "user_id": [None, user_id],
            "model": [None, model_id or "every model"],
            "keys_removed": [None, removed],
        },
        # Stamped with the version in force, not with whatever is published next.
        policy_version=latest,
    )
    return removed
