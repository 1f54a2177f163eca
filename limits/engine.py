"""Decisions: every limit that applies to a check, decided and consumed together.

``check`` turns (tenant, user, model, tokens) into a plan (the tenant's effective rules
for the model's class, global capacity of that class, hard budgets), then asks the backend
once: Redis runs ``lua/check.lua`` in one EVALSHA, the in-process backend runs its twin.
All or nothing: a denied check consumes nothing anywhere. ``commit`` replaces the estimate
by what the inference really used; ``quota`` reads without consuming; ``reset`` clears one
end user's windows.

Keys (all under ``QUOTA_KEY_PREFIX``), hash-tagged by tenant so that a tenant's keys share
one Redis Cluster slot:

    {t:<tenant>}:l:<metric>:<window>:<scope>:<class|*>:<subject>   request / token log
    {t:<tenant>}:l:tokens:…:sum                                     running token sum
    {t:<tenant>}:c:<scope>:<class|*>:<subject>                      concurrency leases
    {t:<tenant>}:b:<budget>:<k|m>                                   budget (tokens, money)
    {t:<tenant>}:req:<request id>                                   first decision, for
                                                                    idempotency and commit
    {t:<tenant>}:events / :denied / :shadow                         usage stream, counters
    {t:<tenant>}:reset                                              a user was reset: no
                                                                    over-limit cache answers
    {g:<class>}:l:…:all                                             global capacity

with subject ``u:<user>:m:<model>``, ``u:<user>``, ``m:<model>`` or ``all``. A user or
model id made only of ``[A-Za-z0-9._@+-]`` (at most 64) is used as is; any other is
replaced by ``~`` and a hash (``~`` is in no id used as is), so no caller-sent text can
forge another key's name. Global capacity is tagged by its class, not by tenant: on one
Redis it is part of the same script call; on a cluster it lives in its own slot (see
docs/engine.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from json.encoder import encode_basestring_ascii as _json_text  # type: ignore[attr-defined]
from typing import Any

from django.conf import settings

from limits import metrics
from limits.backends import (
    Answer,
    BackendUnavailable,
    CheckCall,
    CommitCall,
    LimitSpec,
    LocalBackend,
    PackedArgs,
    RedisBackend,
    limit_args,
    sum_key,
    window_before_upgrade,
)
from limits.overlimit import OverLimitCache
from limits.policystore import Policy, PolicyStore, process_id

logger = logging.getLogger(__name__)

NANO = Decimal(10) ** 9
MICRO = Decimal(10) ** 6
SAFE_ID = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
SUBJECT_SCOPES = {"user_model", "user", "tenant_model", "tenant", "global"}


class UnknownModel(LookupError):
    """The model id is not in the published policy (nothing is counted for it)."""


class UnknownTenant(LookupError):
    """The tenant is not in the published policy, or is inactive."""


class EngineUnavailable(RuntimeError):
    """A commit could not reach the store that holds its request."""


@dataclass(frozen=True)
class LimitState:
    """Where one limit stands after a decision."""

    scope: str  # user_model, user, tenant_model, tenant, global, or budget
    metric: str  # requests, tokens, concurrency, or cost (budgets)
    window: int | str | None  # seconds; "day"/"month" for budgets; None for concurrency
    limit: int | Decimal
    remaining: int | Decimal
    reset: float  # seconds until the oldest counted use leaves (period end for budgets)
    model_class: str | None = None


_Resolved = tuple["LimitState | None", tuple["LimitState", ...], tuple["LimitState", ...]]


class LimitStates:
    """Where a decision's limits stand: worked out from the backend's answer when first read.

    A LimitState per limit costs more than the rest of reading an answer; a caller that only
    wants ``allowed`` (the middleware letting a request through, a service gating its own
    call) does not pay for them. Thread-safe: two threads reading at once both work out the
    same states.
    """

    __slots__ = ("_limits", "_resolved", "_values")

    def __init__(self, limits: tuple[PlannedLimit, ...], values: list[Any]) -> None:
        self._limits = limits
        self._values = values  # laid out as check.lua answers (see backends.Answer)
        self._resolved: _Resolved | None = None

    @classmethod
    def given(
        cls,
        denied_by: LimitState | None = None,
        limits: tuple[LimitState, ...] = (),
        shadow_denied: tuple[LimitState, ...] = (),
    ) -> LimitStates:
        states = cls((), [])
        states._resolved = (denied_by, limits, shadow_denied)
        return states

    def resolved(self) -> _Resolved:
        """(denied_by, limits, shadow_denied)."""
        found = self._resolved
        if found is None:
            found = self._resolved = _states(self._limits, self._values)
        return found

    @property
    def any_shadow_denied(self) -> bool:
        if self._resolved is None:
            return bool(self._values[-1])  # the answer's mask of shadow rules that denied
        return bool(self._resolved[2])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LimitStates) and self.resolved() == other.resolved()

    def __hash__(self) -> int:
        return hash(self.resolved())

    def __repr__(self) -> str:
        denied_by, limits, shadow_denied = self.resolved()
        return f"LimitStates({denied_by=}, {limits=}, {shadow_denied=})"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    request_id: str
    policy_version: int
    retry_after: float | None  # seconds; None when allowed, or when it can never pass
    degraded: bool = False  # answered by a fail mode, not by the shared counters
    repeated: bool = False  # the first decision for this request id, returned again
    states: LimitStates = LimitStates.given()

    @property
    def limits(self) -> tuple[LimitState, ...]:
        """Every enforced limit (shadow rules left out), in the plan's order."""
        return self.states.resolved()[1]

    @property
    def denied_by(self) -> LimitState | None:
        return self.states.resolved()[0]

    @property
    def shadow_denied(self) -> tuple[LimitState, ...]:
        """The shadow rules that would have denied (they never do)."""
        return self.states.resolved()[2]


@dataclass(frozen=True)
class Settlement:
    request_id: str
    input_tokens: int
    output_tokens: int
    status: str
    repeated: bool  # settled before: the first report stands


@dataclass(frozen=True)
class PlannedLimit:
    kind: str
    limit: int
    span: str
    shadow: bool
    label: str
    key_head: str
    key_tail: str
    per_user: bool
    state: LimitState  # the public description; remaining and reset filled per decision


@dataclass(frozen=True)
class Plan:
    tenant_id: int
    model_id: str
    model_class: str
    tier: str
    fail_mode: str
    version: int
    tag: str
    limits: tuple[PlannedLimit, ...]
    estimate_price: int  # nano-units per token (µ-units per 1K): the dearer of in and out
    input_price: int
    output_price: int
    record_ttl_ms: int
    # Worked out once per plan, so that a check only adds its user, request and estimate.
    specs: tuple[LimitSpec, ...]
    limit_args: tuple[str, ...]
    packed_limits: PackedArgs
    # Each limit key of a check, a token window's sum right after its log: (head, tail) of a
    # per-user key (the user's id part goes between), or the whole key and None.
    key_parts: tuple[tuple[str, str | None], ...]
    member_prefix: str  # "<tenant>:", before a request id: see ``_member``
    record_prefix: str
    stream_key: str
    denied_key: str
    shadow_key: str
    prices: str
    event_tenant: str  # the usage event's JSON around its request id, key, user and tokens
    event_model: str
    event_version: str
    decided: tuple[Any, Any]  # the decisions counter of this tier and class: denied, allowed
    shadow_counted: Any
    # (limit index from 1, position in a check's keys) of each enforced request window: the
    # windows the over-limit cache may know to be full.
    request_windows: tuple[tuple[int, int], ...]


def _id_part(value: str) -> str:
    if SAFE_ID.fullmatch(value):
        return value
    # "~" is outside SAFE_ID: no id used as is can spell a hashed one.
    return "~" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def tenant_tag(tenant_id: int) -> str:
    return f"{settings.QUOTA_KEY_PREFIX}:{{t:{tenant_id}}}"


def _micro(price: str) -> int:
    return int(Decimal(price) * MICRO)


def _plan(policy: Policy, tenant_id: int, model_id: str) -> Plan | None:
    plan = policy.plans.get((tenant_id, model_id))
    if plan is not None:
        return plan
    tenant = policy.tenants.get(str(tenant_id))
    model = policy.models.get(model_id)
    if tenant is None or model is None:
        return None
    model_class = model["class"]
    tag = tenant_tag(tenant_id)
    model_part = _id_part(model_id)
    limits: list[PlannedLimit] = []
    longest = 0
    for rule in tenant["rules"]:
        if rule["class"] not in (None, model_class):
            continue
        scope, metric, window = rule["scope"], rule["metric"], rule["window"]
        class_part = rule["class"] or "*"
        if scope == "global":
            head = f"{settings.QUOTA_KEY_PREFIX}:{{g:{_id_part(model_class)}}}"
        else:
            head = tag
        if metric == "concurrency":
            kind = "c"
            span = str(settings.QUOTA_CONCURRENCY_LEASE_SECONDS * 1_000_000)
            head += f":c:{scope}:{class_part}:"
        else:
            kind = "r" if metric == "requests" else "t"
            span = str(window * 1_000_000)
            # "l" (a log, a list): windows kept as sorted sets were under "w" (see
            # docs/engine.md, "Upgrading"); the new name keeps the two apart.
            head += f":l:{metric}:{window}:{scope}:{class_part}:"
            longest = max(longest, window)
        per_user = scope in ("user_model", "user")
        if scope == "user_model":
            head, tail = head + "u:", f":m:{model_part}"
        elif scope == "user":
            head, tail = head + "u:", ""
        elif scope == "tenant_model":
            head, tail = head + f"m:{model_part}", ""
        else:
            head, tail = head + "all", ""
        limits.append(
            PlannedLimit(
                kind=kind,
                limit=rule["limit"],
                span=span,
                shadow=rule["shadow"],
                label=f"rule:{rule['id']}",
                key_head=head,
                key_tail=tail,
                per_user=per_user,
                state=LimitState(scope, metric, window, rule["limit"], 0, 0.0, rule["class"]),
            )
        )
    for budget in tenant["budgets"]:
        if not budget["hard"]:
            continue
        period = budget["period"]
        span = "d" if period == "day" else "m"
        if budget["tokens"] is not None:
            limits.append(
                PlannedLimit(
                    kind="k",
                    limit=budget["tokens"],
                    span=span,
                    shadow=False,
                    label=f"budget:{budget['id']}:tokens",
                    key_head=f"{tag}:b:{budget['id']}:k",
                    key_tail="",
                    per_user=False,
                    state=LimitState("budget", "tokens", period, budget["tokens"], 0, 0.0),
                )
            )
        if budget["cost"] is not None:
            cost = Decimal(budget["cost"])
            limits.append(
                PlannedLimit(
                    kind="m",
                    limit=int(cost * NANO),
                    span=span,
                    shadow=False,
                    label=f"budget:{budget['id']}:cost",
                    key_head=f"{tag}:b:{budget['id']}:m",
                    key_tail="",
                    per_user=False,
                    state=LimitState("budget", "cost", period, cost, Decimal(0), 0.0),
                )
            )
    request_windows: list[tuple[int, int]] = []
    position = 4  # after the record, stream, denied and shadow keys: see ``_check_call``
    for index, item in enumerate(limits, start=1):
        if item.kind == "r" and not item.shadow:
            request_windows.append((index, position))
        position += 2 if item.kind == "t" else 1
    input_price = _micro(model["input_price_per_1k"])
    output_price = _micro(model["output_price_per_1k"])
    record_seconds = max(longest, settings.QUOTA_REQUEST_RECORD_MIN_SECONDS)
    specs = tuple(_spec(item) for item in limits)
    arguments = limit_args(specs)
    tier = tenant["tier"]
    plan = Plan(
        tenant_id=tenant_id,
        model_id=model_id,
        model_class=model_class,
        tier=tier,
        fail_mode=tenant["fail_mode"] if tenant["active"] else "closed",
        version=policy.version,
        tag=tag,
        limits=tuple(limits),
        estimate_price=max(input_price, output_price),
        input_price=input_price,
        output_price=output_price,
        record_ttl_ms=record_seconds * 1000,
        specs=specs,
        limit_args=arguments,
        packed_limits=PackedArgs.of(arguments),
        key_parts=_key_parts(limits),
        member_prefix=_member(tenant_id, ""),
        record_prefix=f"{tag}:req:",
        stream_key=f"{tag}:events",
        denied_key=f"{tag}:denied",
        shadow_key=f"{tag}:shadow",
        prices=f"{input_price}\t{output_price}\t",
        # Exactly what json.dumps(…, separators=(",", ":")) writes, key order included:
        # billing reads entries laid out this way with one pattern.
        event_tenant=f',"tenant":{int(tenant_id)},"key":',
        event_model=f',"model":{_json_text(model_id)},"tokens":',
        event_version=f',"version":{int(policy.version)}}}',
        decided=(
            metrics.DECISIONS.labels(tier, model_class, "denied"),
            metrics.DECISIONS.labels(tier, model_class, "allowed"),
        ),
        shadow_counted=metrics.SHADOW_DENIED.labels(tier, model_class),
        request_windows=tuple(request_windows),
    )
    policy.plans[(tenant_id, model_id)] = plan
    return plan


def _key_parts(limits: list[PlannedLimit]) -> tuple[tuple[str, str | None], ...]:
    parts: list[tuple[str, str | None]] = []
    for item in limits:
        if item.per_user:
            parts.append((item.key_head, item.key_tail))
            if item.kind == "t":
                parts.append((item.key_head, sum_key(item.key_tail)))
        else:
            parts.append((item.key_head, None))
            if item.kind == "t":
                parts.append((sum_key(item.key_head), None))
    return tuple(parts)


def _spec(item: PlannedLimit) -> LimitSpec:
    if item.kind in ("r", "t"):
        ttl = str(2 * int(item.span) // 1000)  # twice the window: see check.lua, "Expiry"
    elif item.kind == "c":
        ttl = str(int(item.span) // 1000 + 1)  # past the lease that expires last
    else:
        ttl = ""  # budgets: worked out from the period in the script
    is_global = item.state.scope == "global"
    return LimitSpec(item.kind, item.limit, item.span, ttl, item.shadow, item.label, is_global)


# -- process state ---------------------------------------------------------------------
_lock = threading.RLock()
_state: dict[Any, Any] = {}


def policy_store() -> PolicyStore:
    store = _state.get("store")
    if store is None:
        with _lock:
            store = _state.get("store")
            if store is None:
                store = _state["store"] = PolicyStore()
    return store


def backend() -> RedisBackend | LocalBackend:
    """The backend of this process: Redis when configured, else the in-process one."""
    key = ("backend", process_id())
    found = _state.get(key)
    if found is None:
        with _lock:
            found = _state.get(key)
            if found is None:
                if settings.QUOTA_BACKEND == "redis" and settings.REDIS_URL:
                    found = RedisBackend(settings.REDIS_URL)
                else:
                    found = local_backend()
                _state[key] = found
    return found


def local_backend() -> LocalBackend:
    found = _state.get("local")
    if found is None:
        with _lock:
            found = _state.get("local")
            if found is None:
                found = _state["local"] = LocalBackend()
    return found


def over_limit_cache() -> OverLimitCache | None:
    """This process's full request windows; None when the cache is off."""
    found = _state.get("over_limit")
    if found is None:
        with _lock:
            found = _state.get("over_limit")
            if found is None:
                seconds = float(settings.QUOTA_OVER_LIMIT_CACHE_SECONDS)
                found = _state["over_limit"] = (
                    OverLimitCache(seconds, int(settings.QUOTA_OVER_LIMIT_CACHE_SIZE))
                    if seconds > 0
                    else False
                )
    return found if found is not False else None  # (an empty cache is falsy)


def reset_state() -> None:
    """Forget every policy, connection and in-process count (tests; settings changed)."""
    with _lock:
        store = _state.pop("store", None)
        for value in list(_state.values()):
            if isinstance(value, RedisBackend):
                value.close()
        _state.clear()
    if store is not None:
        store.stop()


# -- checks ----------------------------------------------------------------------------
def check(
    tenant_id: int,
    user_id: str,
    model: str,
    tokens: int = 0,
    request_id: str | None = None,
    dry_run: bool = False,
    *,
    api_key_id: int | None = None,
    fail_mode: str | None = None,
) -> Decision:
    """Decide one check, consuming every applicable limit or none.

    ``fail_mode`` is what to do when this process holds no policy for the tenant yet (its
    tier's mode, known to the caller from the API key); without it such a check is denied.
    """
    started = time.perf_counter()
    new_id = not request_id
    # 128 random bits as 32 hex digits, like uuid4().hex at a fifth of its cost.
    request_id = request_id or os.urandom(16).hex()
    policy = policy_store().current()
    tenant = policy.tenants.get(str(tenant_id))
    if tenant is None:
        if policy.version and fail_mode is None:
            raise UnknownTenant(tenant_id)
        # Not published here yet (or nothing is): not unlimited, the tier's fail mode.
        return _without_policy(request_id, policy.version, fail_mode or "closed")
    if not tenant["active"]:
        raise UnknownTenant(tenant_id)
    plan = _plan(policy, tenant_id, model)
    if plan is None:
        raise UnknownModel(model)
    call = _check_call(
        plan,
        user_id,
        int(tokens),
        request_id,
        "dry" if dry_run else "check",
        api_key_id,
        new_id=new_id and not dry_run,
    )
    decision = _decide(plan, call)
    metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
    plan.decided[decision.allowed].inc()
    if not decision.repeated and decision.states.any_shadow_denied:
        plan.shadow_counted.inc()
    return decision


def quota(tenant_id: int, user_id: str, model: str) -> Decision:
    """Where the user stands on every limit of this model, consuming nothing."""
    policy = policy_store().current()
    tenant = policy.tenants.get(str(tenant_id))
    if tenant is None or not tenant["active"]:
        raise UnknownTenant(tenant_id)
    plan = _plan(policy, tenant_id, model)
    if plan is None:
        raise UnknownModel(model)
    return _decide(plan, _check_call(plan, user_id, 0, "", "peek", None))


def _check_call(
    plan: Plan,
    user_id: str,
    tokens: int,
    request_id: str,
    mode: str,
    api_key_id: int | None,
    *,
    new_id: bool = False,
) -> CheckCall:
    user_part = _id_part(user_id)
    keys = [plan.record_prefix + request_id, plan.stream_key, plan.denied_key, plan.shadow_key]
    keys += [head if tail is None else head + user_part + tail for head, tail in plan.key_parts]
    event = ""
    if mode == "check":
        api_key = "null" if api_key_id is None else int(api_key_id)
        # One f-string: a third cheaper than joining the nine parts with "+".
        event = (
            f'{{"request_id":{_json_text(request_id)}{plan.event_tenant}{api_key},'
            f'"user":{_json_text(user_id)}{plan.event_model}{tokens}{plan.event_version}'
        )
    return CheckCall(
        keys,
        request_id,
        plan.member_prefix + request_id,
        mode,
        plan.record_ttl_ms,
        event,
        plan.model_id,
        plan.prices,
        tokens,
        tokens * plan.estimate_price,
        plan.specs,
        plan.limit_args,
        plan.packed_limits,
        new_id,
    )


def _member(tenant_id: int, request_id: str) -> str:
    # Request ids are each tenant's own: two tenants may both send "r1", and the global
    # capacity sets they share must count (and settle) them as two requests.
    return f"{tenant_id}:{request_id}"


def _decide(plan: Plan, call: CheckCall) -> Decision:
    chosen = backend()
    cache = None
    if plan.request_windows and call.mode != "peek" and not isinstance(chosen, LocalBackend):
        cache = over_limit_cache()
    if cache is not None and call.mode == "check" and len(cache):
        try:
            decision = _cached_denial(plan, call, cache, chosen)
        except BackendUnavailable:
            return _fail(plan, call)
        if decision is not None:
            return decision
    try:
        answer = chosen.check(call)
    except BackendUnavailable as error:
        decision = _fail(plan, call)
        if error.sent and call.mode == "check" and not decision.allowed:
            _cancel_lost_check(plan.tenant_id, call.request_id)
        return decision
    values, repeated = answer
    if cache is not None and not repeated and int(values[0]) == 0:
        _remember_full_window(cache, plan, call, values)
    return _decision(plan, call, answer, degraded=False)


def _cached_denial(
    plan: Plan, call: CheckCall, cache: OverLimitCache, chosen: RedisBackend
) -> Decision | None:
    """The answer from deny.lua when the cache knows a full window this check counts in;
    None when it knows none, or Redis says the window has moved on (nothing was written)."""
    found = cache.find(call.keys, plan.request_windows, plan.version)
    if found is None:
        return None
    index, key, window = found
    answer = chosen.deny(call, reset_key(plan.tag), window.until_us, _deny_parts(plan, index))
    if answer is None:
        metrics.OVER_LIMIT_CACHE.labels("stale").inc()
        cache.forget(key)
        return None
    metrics.OVER_LIMIT_CACHE.labels("answered").inc()
    return _decision(plan, call, answer, degraded=False)


def known_denials_possible(tenant_id: int) -> bool:
    """Whether ``check_known_denied`` could answer a check of this tenant at all: the cache
    is on and holds a full window of the tenant's, or of a global capacity. Cheap enough to
    ask before a request's body is read."""
    cache = over_limit_cache()
    return cache is not None and cache.may_deny(tenant_tag(tenant_id))


def check_known_denied(
    tenant_id: int,
    user_id: str,
    model: str,
    tokens: int = 0,
    request_id: str | None = None,
    *,
    api_key_id: int | None = None,
) -> Decision | None:
    """The answer to ``check`` when this process's over-limit cache already knows a window
    the check counts in is full, found without the full check; None in every other case
    (nothing known, no policy, an unknown model, Redis away, the window moved on), and then
    nothing was written: ``check`` decides it as usual.

    For a front that answers such checks before its framework runs (limits/cached_denials.py):
    the answer is the one ``check`` would give, metrics included."""
    cache = over_limit_cache()
    if cache is None or not len(cache):
        return None
    chosen = backend()
    if isinstance(chosen, LocalBackend):
        return None
    started = time.perf_counter()
    policy = policy_store().current()
    tenant = policy.tenants.get(str(tenant_id))
    if tenant is None or not tenant["active"]:
        return None
    plan = _plan(policy, tenant_id, model)
    if plan is None or not plan.request_windows:
        return None
    call = _check_call(
        plan, user_id, int(tokens), request_id or os.urandom(16).hex(), "check", api_key_id
    )
    try:
        decision = _cached_denial(plan, call, cache, chosen)
    except BackendUnavailable:
        return None  # ``check`` answers it by the fail mode
    if decision is None:
        return None
    metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
    plan.decided[decision.allowed].inc()
    return decision


def reset_key(tag: str) -> str:
    return f"{tag}:reset"


def _deny_parts(plan: Plan, index: int) -> tuple[str, str, str]:
    """The decision text around its retry, for deny.lua (its ARGV[3…5])."""
    before = "-;-;" * (index - 1)
    after = ";-;-" * (len(plan.limits) - index)
    return f"{index};", f";{before}{plan.limits[index - 1].limit};", after + ";"


def _remember_full_window(
    cache: OverLimitCache, plan: Plan, call: CheckCall, values: list[Any]
) -> None:
    """Remember the window that denied, when it is a request window that frees at a known
    moment (check.lua reports the slowest denying limit, so nothing passes before it)."""
    index, retry = int(values[2]), int(values[3])
    if retry <= 0:
        return
    for window_index, position in plan.request_windows:
        if window_index == index:
            cache.remember(
                call.keys[position], int(values[1]) + retry, retry / 1_000_000, plan.version
            )
            return


def _fail(plan: Plan, call: CheckCall) -> Decision:
    mode = plan.fail_mode
    metrics.DEGRADED.labels(mode).inc()
    if mode == "local":
        return _decision(plan, call, local_backend().check(call), degraded=True)
    return Decision(
        allowed=mode == "open",
        request_id=call.request_id,
        policy_version=plan.version,
        retry_after=None if mode == "open" else float(settings.QUOTA_BREAKER_SECONDS),
        degraded=True,
    )


def _cancel_lost_check(tenant_id: int, request_id: str) -> None:
    """The check went to Redis and its answer was lost, and its caller was told it is
    denied. Redis may have run it all the same: admitted, consumed and recorded a usage
    event, billing a request that will never be made. Keep a cancellation for it, applied
    like a deferred usage report once Redis answers again: it settles such a check as
    cancelled, using nothing (and finds nothing when the check never ran)."""
    from limits.usage import lost_check_cancel

    try:
        lost_check_cancel(tenant_id=tenant_id, request_id=request_id)
    except Exception:  # noqa: BLE001 - the caller gets its fail-mode answer whatever this does
        logger.exception("quota: the cancellation of a lost check was not kept")


def _without_policy(request_id: str, version: int, mode: str) -> Decision:
    metrics.DEGRADED.labels(mode).inc()
    allowed = mode == "open"
    return Decision(
        allowed=allowed,
        request_id=request_id,
        policy_version=version,
        retry_after=None if allowed else float(settings.QUOTA_POLICY_REFRESH_SECONDS),
        degraded=True,
    )


def _state_of(item: PlannedLimit, used: int, reset_us: int) -> LimitState:
    remaining = max(0, item.limit - used)
    public = item.state
    if item.kind == "m":
        return LimitState(
            public.scope,
            public.metric,
            public.window,
            public.limit,
            Decimal(remaining) / NANO,
            reset_us / 1_000_000,
        )
    return LimitState(
        public.scope,
        public.metric,
        public.window,
        public.limit,
        remaining,
        reset_us / 1_000_000,
        public.model_class,
    )


def _states(limits: tuple[PlannedLimit, ...], values: list[Any]) -> _Resolved:
    """(denied_by, limits, shadow_denied) from an answer laid out as check.lua's."""
    denied_index = int(values[2])
    mask = str(values[-1])
    shadow_indexes = {int(i) for i in mask.split(",") if i} if mask else set()
    states: list[LimitState] = []
    shadow: list[LimitState] = []
    denied_by = None
    # A repeated request id answers what its first check answered, which may have met
    # another plan (another model, an older policy): only the limits both share are shown.
    answered = (len(values) - 5) // 2
    for index, item in enumerate(limits[:answered], start=1):
        position = 2 + 2 * index
        used = values[position]
        if used == "-":
            continue  # not read: a denial answered from the over-limit cache
        state = _state_of(item, int(used), int(values[position + 1]))
        if item.shadow:
            if index in shadow_indexes:
                shadow.append(state)
            continue
        states.append(state)
        if index == denied_index:
            denied_by = state
    return denied_by, tuple(states), tuple(shadow)


def _decision(plan: Plan, call: CheckCall, answer: Answer, *, degraded: bool) -> Decision:
    values, repeated = answer
    allowed = int(values[0]) == 1
    retry_after = None
    if not allowed:
        retry = int(values[3])
        if retry >= 0:  # else none, or never (NEVER): the check alone exceeds a limit
            retry_after = retry / 1_000_000
    # As Decision(...) would make it, at half the cost: a frozen dataclass's __init__ sets each
    # field through object.__setattr__, one call per field, on every check.
    decision = _new_decision(Decision)
    _set_attribute(
        decision,
        "__dict__",
        {
            "allowed": allowed,
            "request_id": call.request_id,
            "policy_version": plan.version,
            "retry_after": retry_after,
            "degraded": degraded,
            "repeated": repeated,
            "states": LimitStates(plan.limits, values),
        },
    )
    return decision


_new_decision = object.__new__
_set_attribute = object.__setattr__


# -- settling --------------------------------------------------------------------------
def commit(
    tenant_id: int,
    request_id: str,
    input_tokens: int,
    output_tokens: int,
    status: str = "ok",
) -> Settlement | None:
    """Replace a check's estimate by what it used; None for an unknown request id.

    Idempotent: the first report stands, a repeat changes nothing and says so.
    """
    tag = tenant_tag(tenant_id)
    record_key = f"{tag}:req:{request_id}"
    stores: list[RedisBackend | LocalBackend] = [backend()]
    if not isinstance(stores[0], LocalBackend):
        stores.append(local_backend())  # decided there while Redis was away
    unavailable = False
    for store in stores:
        try:
            stored = store.stored_request(record_key)
        except BackendUnavailable:
            unavailable = True
            continue
        if stored is None:
            continue
        if stored.settled is not None:
            return _settlement(request_id, stored.settled, repeated=True)
        input_price, output_price, extra = _remembered(stored.extra)
        cost = input_tokens * input_price + output_tokens * output_price
        summary = f"{input_tokens};{output_tokens};{status}"
        event = json.dumps(
            {
                "request_id": request_id,
                "tenant": tenant_id,
                "key": extra.get("key"),
                "user": extra.get("user"),
                "model": extra.get("model"),
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "status": status,
            },
            separators=(",", ":"),
        )
        call = CommitCall(
            record_key=record_key,
            stream_key=f"{tag}:events",
            request_id=request_id,
            member=_member(tenant_id, request_id),
            tokens=input_tokens + output_tokens,
            cost=cost,
            summary=summary,
            event=event,
        )
        try:
            outcome, settled = store.commit(call, stored)
        except BackendUnavailable:
            unavailable = True
            continue
        if outcome == -1:
            continue
        return _settlement(request_id, settled, repeated=outcome == 0)
    if unavailable:
        raise EngineUnavailable("the limiter's store is unreachable; report the usage again")
    return None


def _remembered(extra: str) -> tuple[int, int, dict[str, Any]]:
    """The prices (µ-units per 1K input and output tokens) and the usage event (user, model,
    key) that a check remembered for its commit: "<input>\t<output>\t<event JSON>"."""
    if extra.startswith("{"):
        # Remembered as one JSON document by the engine before this layout; such records
        # live for at most their longest window.
        data = json.loads(extra)
        return data.get("input_price", 0), data.get("output_price", 0), data
    if not extra:
        return 0, 0, {}
    input_price, output_price, event = extra.split("\t", 2)
    return int(input_price), int(output_price), json.loads(event)


def _settlement(request_id: str, summary: str, *, repeated: bool) -> Settlement:
    input_tokens, output_tokens, status = summary.split(";")
    return Settlement(request_id, int(input_tokens), int(output_tokens), status, repeated)


def reset(tenant_id: int, user_id: str, model: str | None = None) -> int:
    """Clear one end user's windows and leases (all models, or one); returns keys removed."""
    policy = policy_store().current()
    models = [model] if model is not None else list(policy.models)
    user_part = _id_part(user_id)
    keys: set[str] = set()
    for model_id in models:
        plan = _plan(policy, tenant_id, model_id)
        if plan is None:
            continue
        for item in plan.limits:
            if item.per_user:
                key = item.key_head + user_part + item.key_tail
                keys.add(key)
                if item.kind == "t":
                    keys.add(sum_key(key))
                if item.kind in ("r", "t"):
                    # A window not carried over yet would be by the next check: it goes too.
                    old = window_before_upgrade(key)
                    keys.add(old)
                    if item.kind == "t":
                        keys.add(sum_key(old))
    ordered = sorted(keys)
    removed = 0
    for store in {id(backend()): backend(), id(local_backend()): local_backend()}.values():
        try:
            removed += store.delete(ordered)
        except BackendUnavailable:
            raise EngineUnavailable("the limiter's store is unreachable; try again") from None
    cache = over_limit_cache()
    if cache is not None and removed:
        chosen = backend()
        if isinstance(chosen, RedisBackend):
            # Every process may hold a window of this tenant as full: while the mark lives
            # (as long as any entry can), none answers from its cache. A denial that this or
            # another process remembers after the mark is set is refused by it too.
            try:
                chosen.mark_reset(reset_key(tenant_tag(tenant_id)), int((cache.seconds + 1) * 1000))
            except BackendUnavailable:
                raise EngineUnavailable("the limiter's store is unreachable; try again") from None
        cache.clear()
    return removed
