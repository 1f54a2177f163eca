"""Policy as a file: read, validate and apply a YAML or JSON policy; write the model back out.

Loading happens in two steps. The whole file is read and checked first, by a small
hand-written validator that walks the document and collects every problem with its path
in the file (``tiers[1].limits[0].window: must be at least 1 second``), so an operator sees
all mistakes at once. Only a file without problems is applied, in one ``policy_batch``
through ``object_save`` / ``object_delete``, which run each model's ``full_clean()`` and
write the audit trail; a model-level error found there is reported with its path too and
rolls the whole batch back.

For every model class, tier and tenant in the file, its own fields, rules, budgets and
capacity rules become exactly what the file says; absent optional fields mean their
defaults and absent lists mean "none". Entities the file does not mention (and models
the file does not list) are left as they are. An unchanged object is never written, so
loading the same file twice leaves no trace.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import IntegrityError, models

from limits.identifiers import InvalidIdentifier, normalize_model_id, normalize_slug
from limits.models import (
    MONEY_DIGITS,
    PRICE_DIGITS,
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
    format_window,
)
from limits.selectors import rule_sort_key
from limits.services import Actor, object_delete, object_save, policy_batch

SECTIONS = ("model_classes", "tiers", "tenants")
MAX_BIG_INTEGER = 2**63 - 1
MAX_WINDOW_SECONDS = 2**31 - 1
MAX_PRIORITY = 32767
MAX_ALERT_PERCENT = 1000
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_OWNER_SCOPES = [scope for scope in Scope.values if scope != Scope.GLOBAL]

# File keys of the model fields that full_clean() may name, so its errors get file paths.
_FILE_KEYS = {
    "window_seconds": "window",
    "is_shadow": "shadow",
    "model_id": "id",
    "token_limit": "tokens",
    "cost_limit": "cost",
    "is_hard": "hard",
    "alert_thresholds": "alert_at",
    "is_active": "active",
}


class PolicyFileError(Exception):
    """The file cannot be loaded; ``problems`` holds one line per problem, each with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- reading ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice is an error, not "last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"found the key {key!r} twice in one object")
        result[key] = value
    return result


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_float=Decimal)
    except json.JSONDecodeError as error:
        raise PolicyFileError(
            [f"not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}"]
        ) from None
    except ValueError as error:
        raise PolicyFileError([f"not valid JSON: {error}"]) from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyFileError([f"not valid YAML: {where}{error.problem or error}"]) from None
    except yaml.YAMLError as error:
        raise PolicyFileError([f"not valid YAML: {error}"]) from None


def policy_parse(*, text: str, file_format: str | None = None) -> Any:
    """Parse a policy file's text. ``file_format`` is "json", "yaml" or None to sniff.

    JSON is read by a JSON parser when named (exact error positions, numbers kept as
    Decimal); otherwise YAML, which also reads JSON. A key written twice is an error in both.
    """
    if not text.strip():
        raise PolicyFileError(["the file is empty"])
    if file_format == "json":
        return _parse_json(text)
    if file_format is None and text.lstrip().startswith("{"):
        try:
            return _parse_json(text)
        except PolicyFileError:
            pass  # a YAML flow mapping, or broken JSON: YAML says where
    data = _parse_yaml(text)
    if data is None:
        raise PolicyFileError(["the file is empty (nothing but comments)"])
    return data


def file_format_for(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith((".yaml", ".yml")):
        return "yaml"
    return None


# --- validating ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    path: str
    scope: str
    metric: str
    limit: int
    window: int | None
    model_class: str | None
    shadow: bool

    @property
    def identity(self) -> tuple[str, str, str | None, int | None]:
        return (self.scope, self.metric, self.model_class, self.window)


@dataclass(frozen=True)
class ModelSpec:
    path: str
    model_id: str
    input_price: Decimal
    output_price: Decimal
    active: bool


@dataclass(frozen=True)
class ModelClassSpec:
    path: str
    name: str
    description: str
    capacity: list[RuleSpec]
    models: list[ModelSpec]


@dataclass(frozen=True)
class TierSpec:
    path: str
    name: str
    description: str
    priority: int
    fail_mode: str
    limits: list[RuleSpec]


@dataclass(frozen=True)
class BudgetSpec:
    path: str
    period: str
    tokens: int | None
    cost: Decimal | None
    hard: bool
    alert_at: list[int]


@dataclass(frozen=True)
class TenantSpec:
    path: str
    slug: str
    name: str
    tier: str
    active: bool
    limits: list[RuleSpec]
    budgets: list[BudgetSpec]


@dataclass(frozen=True)
class PolicyPlan:
    """A validated policy file, every id normalised, ready to apply."""

    model_classes: list[ModelClassSpec]
    tiers: list[TierSpec]
    tenants: list[TenantSpec]


_MISSING = object()


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'text "{value}"'
    if isinstance(value, int | float | Decimal):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _listed(values: Iterable[str]) -> str:
    return ", ".join(values)


class _Validator:
    """Walks the parsed document once, collecting problems instead of stopping at the first."""

    def __init__(self, *, known_tiers: set[str], known_classes: set[str]) -> None:
        self.problems: list[str] = []
        self.known_tiers = set(known_tiers)
        self.known_classes = set(known_classes)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    # Shapes

    def mapping(
        self, value: Any, path: str, *, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping of keys to values, not {_describe(value)}")
            return None
        allowed = required + optional
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f'; did you mean "{hint[0]}"?' if hint else ""
                self.problem(
                    _at(path, str(key)),
                    f"unknown key{suggestion} (expected {_listed(allowed)})",
                )
        for key in required:
            if value.get(key) is None:
                self.problem(_at(path, key), "is required")
        # null is written "nothing here": treat it as an absent key
        return {key: item for key, item in value.items() if key in allowed and item is not None}

    def items(self, value: Any, path: str) -> list[tuple[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(path, f"must be a list, not {_describe(value)}")
            return []
        return [(_at(path, index), item) for index, item in enumerate(value)]

    # Scalars

    def text(self, value: Any, path: str, *, max_length: int) -> str | None:
        if not isinstance(value, str):
            self.problem(path, f"must be text, not {_describe(value)}")
            return None
        if len(value) > max_length:
            self.problem(path, f"must be at most {max_length} characters")
            return None
        if any(not character.isprintable() and character not in "\n\t" for character in value):
            self.problem(path, "must contain only printable characters, tabs and line breaks")
            return None
        return value

    def identifier(self, value: Any, path: str, normalize: Callable[[str], str]) -> str | None:
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            value = str(value)  # `name: 2024` is a fine slug, though YAML reads a number
        if not isinstance(value, str):
            self.problem(path, f"must be text, not {_describe(value)}")
            return None
        try:
            return normalize(value)
        except InvalidIdentifier as error:
            self.problem(path, str(error))
            return None

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, f"must be a whole number ≥ {minimum}, not {_describe(value)}")
            return None
        if value < minimum:
            self.problem(path, f"must be a whole number ≥ {minimum}")
            return None
        if value > maximum:
            self.problem(path, f"must be at most {maximum}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.problem(path, f"must be true or false, not {_describe(value)}")
            return None
        return value

    def choice(self, value: Any, path: str, *, kind: str, choices: list[str]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            shown = f'"{value}"' if isinstance(value, str) else _describe(value)
            self.problem(path, f"unknown {kind} {shown}; expected one of {_listed(choices)}")
            return None
        return value

    def decimal(self, value: Any, path: str, *, places: int, max_digits: int) -> Decimal | None:
        message = "must be a decimal number ≥ 0"
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
            self.problem(path, f"{message}, not {_describe(value)}")
            return None
        try:
            # repr() of a float is its shortest exact spelling: 0.0025, not 0.00250000000001
            number = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
        except InvalidOperation:
            self.problem(path, f"{message}, not {_describe(value)}")
            return None
        if not number.is_finite():
            self.problem(path, f"{message}, not {_describe(value)}")
            return None
        if number < 0:
            self.problem(path, message)
            return None
        if number >= Decimal(10) ** (max_digits - places):
            self.problem(path, f"must be less than {10 ** (max_digits - places)}")
            return None
        step = Decimal(1).scaleb(-places)
        quantized = number.quantize(step)
        if quantized != number:
            self.problem(path, f"must have at most {places} decimal places")
            return None
        return quantized

    def window(self, value: Any, path: str) -> int | None:
        message = "must be whole seconds or a duration like 30s, 15m, 1h, 1d"
        if isinstance(value, str):
            match = _DURATION.match(value.strip())
            if not match:
                self.problem(path, f"{message}, not {_describe(value)}")
                return None
            seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        elif isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        else:
            self.problem(path, f"{message}, not {_describe(value)}")
            return None
        if seconds < 1:
            self.problem(path, "must be at least 1 second")
            return None
        if seconds > MAX_WINDOW_SECONDS:
            self.problem(path, f"must be at most {MAX_WINDOW_SECONDS} seconds")
            return None
        return seconds

    # Entities

    def document(self, data: Any) -> PolicyPlan | None:
        if not isinstance(data, dict):
            self.problems.append(
                f"the top level must be a mapping with {_listed(SECTIONS)}, not {_describe(data)}"
            )
            return None
        for key in data:
            if key not in SECTIONS:
                self.problem(str(key), f"unknown key (expected {_listed(SECTIONS)})")
        if not any(key in data for key in SECTIONS):
            self.problems.append(f"the file needs at least one of {_listed(SECTIONS)}")
            return None
        model_classes = self.model_classes(data.get("model_classes"))
        tiers = self.tiers(data.get("tiers"))
        tenants = self.tenants(data.get("tenants"))
        return PolicyPlan(model_classes=model_classes, tiers=tiers, tenants=tenants)

    def model_classes(self, value: Any) -> list[ModelClassSpec]:
        entries = self.items(value, "model_classes")
        # Names first, so that a rule may narrow to a class written further down the file.
        names: dict[str, str] = {}
        name_at: dict[str, str] = {}
        for path, entry in entries:
            if not isinstance(entry, dict) or entry.get("name") is None:
                continue
            name = self.identifier(entry["name"], _at(path, "name"), normalize_slug)
            if name is not None and name in names:
                self.problem(
                    _at(path, "name"), f'duplicate model class "{name}" (also {names[name]})'
                )
            elif name is not None:
                names[name] = path
                name_at[path] = name
        self.known_classes |= set(names)

        specs = []
        model_ids: dict[str, str] = {}
        for path, entry in entries:
            fields = self.mapping(
                entry, path, required=("name",), optional=("description", "capacity", "models")
            )
            if fields is None:
                continue
            name = name_at.get(path)
            description = self.text(
                fields.get("description", ""), _at(path, "description"), max_length=500
            )
            capacity = self.rules(
                fields.get("capacity"), _at(path, "capacity"), capacity_of=name or ""
            )
            class_models = []
            for model_path, model_entry in self.items(fields.get("models"), _at(path, "models")):
                model = self.model(model_entry, model_path)
                if model is None:
                    continue
                if model.model_id in model_ids:
                    self.problem(
                        _at(model_path, "id"),
                        f'duplicate model id "{model.model_id}" (also {model_ids[model.model_id]})',
                    )
                    continue
                model_ids[model.model_id] = model_path
                class_models.append(model)
            if name is not None and description is not None:
                specs.append(ModelClassSpec(path, name, description, capacity, class_models))
        return specs

    def model(self, value: Any, path: str) -> ModelSpec | None:
        fields = self.mapping(
            value,
            path,
            required=("id", "input_price_per_1k", "output_price_per_1k"),
            optional=("active",),
        )
        if fields is None:
            return None
        model_id = (
            self.identifier(fields["id"], _at(path, "id"), normalize_model_id)
            if "id" in fields
            else None
        )
        prices = [
            self.decimal(
                fields[key],
                _at(path, key),
                places=PRICE_DIGITS["decimal_places"],
                max_digits=PRICE_DIGITS["max_digits"],
            )
            if key in fields
            else None
            for key in ("input_price_per_1k", "output_price_per_1k")
        ]
        active = self.boolean(fields.get("active", True), _at(path, "active"))
        if model_id is None or prices[0] is None or prices[1] is None or active is None:
            return None
        return ModelSpec(path, model_id, prices[0], prices[1], active)

    def tiers(self, value: Any) -> list[TierSpec]:
        specs = []
        names: dict[str, str] = {}
        for path, entry in self.items(value, "tiers"):
            fields = self.mapping(
                entry,
                path,
                required=("name",),
                optional=("description", "priority", "fail_mode", "limits"),
            )
            if fields is None:
                continue
            name = (
                self.identifier(fields["name"], _at(path, "name"), normalize_slug)
                if "name" in fields
                else None
            )
            if name is not None and name in names:
                self.problem(_at(path, "name"), f'duplicate tier "{name}" (also {names[name]})')
                name = None
            elif name is not None:
                names[name] = path
            description = self.text(
                fields.get("description", ""), _at(path, "description"), max_length=500
            )
            priority = self.integer(
                fields.get("priority", Tier._meta.get_field("priority").get_default()),
                _at(path, "priority"),
                minimum=0,
                maximum=MAX_PRIORITY,
            )
            fail_mode = self.choice(
                fields.get("fail_mode", FailMode.CLOSED.value),
                _at(path, "fail_mode"),
                kind="fail mode",
                choices=FailMode.values,
            )
            limits = self.rules(fields.get("limits"), _at(path, "limits"))
            if None not in (name, description, priority, fail_mode):
                specs.append(
                    TierSpec(path, name, description, priority, fail_mode, limits)  # type: ignore[arg-type]
                )
        self.known_tiers |= set(names)
        return specs

    def tenants(self, value: Any) -> list[TenantSpec]:
        specs = []
        slugs: dict[str, str] = {}
        for path, entry in self.items(value, "tenants"):
            fields = self.mapping(
                entry,
                path,
                required=("slug", "name", "tier"),
                optional=("active", "limits", "budgets"),
            )
            if fields is None:
                continue
            slug = (
                self.identifier(fields["slug"], _at(path, "slug"), normalize_slug)
                if "slug" in fields
                else None
            )
            if slug is not None and slug in slugs:
                self.problem(_at(path, "slug"), f'duplicate tenant "{slug}" (also {slugs[slug]})')
                slug = None
            elif slug is not None:
                slugs[slug] = path
            name = (
                self.text(fields["name"], _at(path, "name"), max_length=200)
                if "name" in fields
                else None
            )
            if name is not None and not name.strip():
                self.problem(_at(path, "name"), "must not be empty")
                name = None
            tier = (
                self.identifier(fields["tier"], _at(path, "tier"), normalize_slug)
                if "tier" in fields
                else None
            )
            if tier is not None and tier not in self.known_tiers:
                self.problem(_at(path, "tier"), f'unknown tier "{tier}"')
                tier = None
            active = self.boolean(fields.get("active", True), _at(path, "active"))
            limits = self.rules(fields.get("limits"), _at(path, "limits"))
            budgets = self.budgets(fields.get("budgets"), _at(path, "budgets"))
            if None not in (slug, name, tier, active):
                specs.append(
                    TenantSpec(path, slug, name.strip(), tier, active, limits, budgets)  # type: ignore[arg-type,union-attr]
                )
        return specs

    def rules(self, value: Any, path: str, *, capacity_of: str | None = None) -> list[RuleSpec]:
        """A tier's or tenant's limits, or (``capacity_of`` a class name) a class's capacity."""
        specs = []
        seen: dict[tuple[str, str, str | None, int | None], str] = {}
        for rule_path, entry in self.items(value, path):
            rule = self.rule(entry, rule_path, capacity_of=capacity_of)
            if rule is None:
                continue
            if rule.identity in seen:
                self.problem(
                    rule_path,
                    "duplicate rule: same scope, metric, model class and window as "
                    f"{seen[rule.identity]}",
                )
                continue
            seen[rule.identity] = rule_path
            specs.append(rule)
        return specs

    def rule(self, value: Any, path: str, *, capacity_of: str | None) -> RuleSpec | None:
        is_capacity = capacity_of is not None
        fields = self.mapping(
            value,
            path,
            required=("metric", "limit") if is_capacity else ("scope", "metric", "limit"),
            optional=("scope", "window", "model_class", "shadow")
            if is_capacity
            else ("window", "model_class", "shadow"),
        )
        if fields is None:
            return None
        ok = True
        scope: str | None
        if is_capacity:
            scope = Scope.GLOBAL.value
            if fields.get("scope", Scope.GLOBAL.value) != Scope.GLOBAL.value:
                self.problem(
                    _at(path, "scope"),
                    "capacity rules are global (every tenant on this class); "
                    "leave scope out or write global",
                )
                ok = False
        elif fields.get("scope") == Scope.GLOBAL.value:
            self.problem(
                _at(path, "scope"),
                "global capacity belongs to a model class; write it under model_classes[].capacity",
            )
            scope = None
        else:
            scope = (
                self.choice(
                    fields["scope"], _at(path, "scope"), kind="scope", choices=_OWNER_SCOPES
                )
                if "scope" in fields
                else None
            )
        metric = (
            self.choice(fields["metric"], _at(path, "metric"), kind="metric", choices=Metric.values)
            if "metric" in fields
            else None
        )
        limit = (
            self.integer(fields["limit"], _at(path, "limit"), minimum=1, maximum=MAX_BIG_INTEGER)
            if "limit" in fields
            else None
        )
        window: int | None = None
        if metric == Metric.CONCURRENCY:
            if "window" in fields:
                self.problem(_at(path, "window"), "concurrency limits have no window; leave it out")
                ok = False
        elif "window" in fields:
            window = self.window(fields["window"], _at(path, "window"))
            ok = ok and window is not None
        elif metric is not None:
            self.problem(_at(path, "window"), f"is required for {metric} limits")
            ok = False
        model_class: str | None = None
        if "model_class" in fields:
            model_class = self.identifier(
                fields["model_class"], _at(path, "model_class"), normalize_slug
            )
            if model_class is None:
                ok = False
            elif is_capacity and model_class != capacity_of:
                self.problem(
                    _at(path, "model_class"),
                    f'a capacity rule protects its own model class "{capacity_of}"; '
                    "leave model_class out",
                )
                ok = False
            elif model_class not in self.known_classes:
                self.problem(_at(path, "model_class"), f'unknown model class "{model_class}"')
                ok = False
        if is_capacity:
            model_class = capacity_of
        shadow = self.boolean(fields.get("shadow", False), _at(path, "shadow"))
        if not ok or scope is None or metric is None or limit is None or shadow is None:
            return None
        return RuleSpec(path, scope, metric, limit, window, model_class, shadow)

    def budgets(self, value: Any, path: str) -> list[BudgetSpec]:
        specs = []
        periods: dict[str, str] = {}
        for budget_path, entry in self.items(value, path):
            budget = self.budget(entry, budget_path)
            if budget is None:
                continue
            if budget.period in periods:
                self.problem(
                    _at(budget_path, "period"),
                    f'duplicate budget period "{budget.period}" (also {periods[budget.period]})',
                )
                continue
            periods[budget.period] = budget_path
            specs.append(budget)
        return specs

    def budget(self, value: Any, path: str) -> BudgetSpec | None:
        fields = self.mapping(
            value, path, required=("period",), optional=("tokens", "cost", "hard", "alert_at")
        )
        if fields is None:
            return None
        ok = True
        period = (
            self.choice(
                fields["period"], _at(path, "period"), kind="period", choices=BudgetPeriod.values
            )
            if "period" in fields
            else None
        )
        tokens = None
        if "tokens" in fields:
            tokens = self.integer(
                fields["tokens"], _at(path, "tokens"), minimum=0, maximum=MAX_BIG_INTEGER
            )
            ok = ok and tokens is not None
        cost = None
        if "cost" in fields:
            cost = self.decimal(
                fields["cost"],
                _at(path, "cost"),
                places=MONEY_DIGITS["decimal_places"],
                max_digits=MONEY_DIGITS["max_digits"],
            )
            ok = ok and cost is not None
        if "tokens" not in fields and "cost" not in fields:
            self.problem(path, "a budget needs tokens, cost or both")
            ok = False
        hard = self.boolean(fields.get("hard", True), _at(path, "hard"))
        alert_at: list[int] = []
        for alert_path, percent in self.items(fields.get("alert_at"), _at(path, "alert_at")):
            checked = self.integer(percent, alert_path, minimum=1, maximum=MAX_ALERT_PERCENT)
            if checked is None:
                ok = False
            else:
                alert_at.append(checked)
        if not ok or period is None or hard is None:
            return None
        return BudgetSpec(path, period, tokens, cost, hard, sorted(set(alert_at)))


def policy_validate(data: Any) -> PolicyPlan:
    """Check a parsed policy file completely; raise PolicyFileError listing every problem.

    Tiers and model classes that rules and tenants refer to may be in the file or
    already in the database.
    """
    validator = _Validator(
        known_tiers=set(Tier.objects.values_list("name", flat=True)),
        known_classes=set(ModelClass.objects.values_list("name", flat=True)),
    )
    plan = validator.document(data)
    if validator.problems or plan is None:
        raise PolicyFileError(validator.problems)
    return plan


# --- applying --------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load changed (or, for a dry run, would change): one line per change."""

    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def is_unchanged(self) -> bool:
        return not (self.created or self.changed or self.deleted)

    def lines(self) -> list[str]:
        verbs = ("created", "changed", "deleted")
        if self.dry_run:
            verbs = ("would create", "would change", "would delete")
        return [
            f"{verb} {line}"
            for verb, group in zip(verbs, (self.created, self.changed, self.deleted), strict=True)
            for line in group
        ]


class _Rollback(Exception):
    """Leaves the batch so that its transaction rolls back (dry run, or errors found)."""


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Applier:
    def __init__(self, *, actor: Actor) -> None:
        self.actor = actor
        self.result = LoadResult()
        self.problems: list[str] = []

    def save(
        self, instance: models.Model, values: dict[str, Any], *, path: str, label: str
    ) -> bool:
        """Create or update one object with ``values``; False when full_clean() refused it."""
        is_new = instance.pk is None
        differences = []
        for name, new in values.items():
            if isinstance(new, models.Model):
                old_id = getattr(instance, f"{name}_id")
                if old_id != new.pk:
                    old = getattr(instance, name) if old_id is not None else None
                    differences.append(f"{name} {_shown(old)} → {_shown(new)}")
            elif getattr(instance, name) != new:
                differences.append(f"{name} {_shown(getattr(instance, name))} → {_shown(new)}")
            setattr(instance, name, new)
        if not is_new and not differences:
            return True
        try:
            changed = object_save(instance=instance, actor=self.actor)
        except ValidationError as error:
            self.validation_problems(error, path)
            return False
        if is_new:
            self.result.created.append(label)
        elif changed:
            self.result.changed.append(f"{label}: {', '.join(differences)}")
        return True

    def validation_problems(self, error: ValidationError, path: str) -> None:
        if not hasattr(error, "error_dict"):
            self.problems.extend(f"{path}: {message}" for message in error.messages)
            return
        for name, messages in error.message_dict.items():
            where = path if name == NON_FIELD_ERRORS else _at(path, _FILE_KEYS.get(name, name))
            for message in messages:
                text = message.rstrip(".")
                self.problems.append(f"{where}: {text[:1].lower()}{text[1:]}")

    def apply(self, plan: PolicyPlan) -> None:
        # Parents first, so children can point at them; an entity that full_clean() refused
        # is left out of the maps and its children are skipped (the batch rolls back anyway).
        classes = self.model_classes(plan.model_classes)
        self.ai_models(plan.model_classes, classes)
        tiers = self.tiers(plan.tiers)
        tenants = self.tenants(plan.tenants, tiers)
        for class_spec in plan.model_classes:
            if class_spec.name in classes:
                self.rules(
                    owner={},
                    existing=LimitRule.objects.filter(
                        scope=Scope.GLOBAL, model_class=classes[class_spec.name]
                    ),
                    specs=class_spec.capacity,
                    classes=classes,
                    label=f"model class {class_spec.name} capacity",
                )
        for tier_spec in plan.tiers:
            if tier_spec.name in tiers:
                tier = tiers[tier_spec.name]
                self.rules(
                    owner={"tier": tier},
                    existing=LimitRule.objects.filter(tier=tier),
                    specs=tier_spec.limits,
                    classes=classes,
                    label=f"tier {tier_spec.name} rule",
                )
        for tenant_spec in plan.tenants:
            if tenant_spec.slug in tenants:
                tenant = tenants[tenant_spec.slug]
                self.rules(
                    owner={"tenant": tenant},
                    existing=LimitRule.objects.filter(tenant=tenant),
                    specs=tenant_spec.limits,
                    classes=classes,
                    label=f"tenant {tenant_spec.slug} rule",
                )
                self.budgets(tenant, tenant_spec)

    def model_classes(self, specs: list[ModelClassSpec]) -> dict[str, ModelClass]:
        """Every class a rule may name: those in the database, plus the file's once saved."""
        classes = {item.name: item for item in ModelClass.objects.all()}
        for spec in specs:
            instance = classes.pop(spec.name, None) or ModelClass(name=spec.name)
            values = {"description": spec.description}
            if self.save(instance, values, path=spec.path, label=f"model class {spec.name}"):
                classes[spec.name] = instance
        return classes

    def ai_models(self, specs: list[ModelClassSpec], classes: dict[str, ModelClass]) -> None:
        existing = {item.model_id: item for item in AIModel.objects.all()}
        for class_spec in specs:
            if class_spec.name not in classes:
                continue
            for spec in class_spec.models:
                instance = existing.get(spec.model_id) or AIModel(model_id=spec.model_id)
                values = {
                    "model_class": classes[class_spec.name],
                    "input_price_per_1k": spec.input_price,
                    "output_price_per_1k": spec.output_price,
                    "is_active": spec.active,
                }
                self.save(instance, values, path=spec.path, label=f"AI model {spec.model_id}")

    def tiers(self, specs: list[TierSpec]) -> dict[str, Tier]:
        tiers = {item.name: item for item in Tier.objects.all()}
        for spec in specs:
            instance = tiers.pop(spec.name, None) or Tier(name=spec.name)
            values = {
                "description": spec.description,
                "priority": spec.priority,
                "fail_mode": spec.fail_mode,
            }
            if self.save(instance, values, path=spec.path, label=f"tier {spec.name}"):
                tiers[spec.name] = instance
        return tiers

    def tenants(self, specs: list[TenantSpec], tiers: dict[str, Tier]) -> dict[str, Tenant]:
        existing = {item.slug: item for item in Tenant.objects.all()}
        tenants = {}
        for spec in specs:
            if spec.tier not in tiers:
                continue
            instance = existing.get(spec.slug) or Tenant(slug=spec.slug)
            values = {"name": spec.name, "tier": tiers[spec.tier], "is_active": spec.active}
            if self.save(instance, values, path=spec.path, label=f"tenant {spec.slug}"):
                tenants[spec.slug] = instance
        return tenants

    def rules(
        self,
        *,
        owner: dict[str, Any],
        existing: models.QuerySet[LimitRule],
        specs: list[RuleSpec],
        classes: dict[str, ModelClass],
        label: str,
    ) -> None:
        # A rule is known by its identity; only limit and shadow can change in place, so an
        # unchanged rule keeps its row (and its counters' meaning) across loads.
        current = {
            (rule.scope, rule.metric, rule.model_class_id, rule.window_seconds): rule
            for rule in existing.select_related("model_class")
        }
        wanted = {}
        for spec in specs:
            model_class = classes.get(spec.model_class) if spec.model_class else None
            if spec.model_class and (model_class is None or model_class.pk is None):
                continue
            class_id = model_class.pk if model_class is not None else None
            wanted[(spec.scope, spec.metric, class_id, spec.window)] = (spec, model_class)
        for identity, rule in current.items():
            if identity not in wanted:
                object_delete(instance=rule, actor=self.actor)
                self.result.deleted.append(f"{label} {rule}")
        for identity, (spec, model_class) in wanted.items():
            rule = current.get(identity) or LimitRule(
                scope=spec.scope,
                metric=spec.metric,
                window_seconds=spec.window,
                model_class=model_class,
                **owner,
            )
            self.save(
                rule,
                {"limit": spec.limit, "is_shadow": spec.shadow},
                path=spec.path,
                label=f"{label} {_rule_label(spec)}",
            )

    def budgets(self, tenant: Tenant, spec: TenantSpec) -> None:
        current = {budget.period: budget for budget in Budget.objects.filter(tenant=tenant)}
        wanted = {budget.period: budget for budget in spec.budgets}
        for period, budget in current.items():
            if period not in wanted:
                object_delete(instance=budget, actor=self.actor)
                self.result.deleted.append(f"tenant {tenant.slug} budget {budget}")
        for period, budget_spec in wanted.items():
            instance = current.get(period) or Budget(tenant=tenant, period=period)
            self.save(
                instance,
                {
                    "token_limit": budget_spec.tokens,
                    "cost_limit": budget_spec.cost,
                    "is_hard": budget_spec.hard,
                    "alert_thresholds": budget_spec.alert_at,
                },
                path=budget_spec.path,
                label=f"tenant {tenant.slug} {period} budget",
            )


def _rule_label(spec: RuleSpec) -> str:
    """A rule by its identity, the way LimitRule's str() spells it."""
    window = f" per {format_window(spec.window)}" if spec.window else ""
    narrowed = f" [{spec.model_class}]" if spec.model_class and spec.scope != Scope.GLOBAL else ""
    return f"{spec.scope} {spec.metric}{window}{narrowed}"


def policy_apply(
    *, plan: PolicyPlan, actor: Actor, reason: str, dry_run: bool = False
) -> LoadResult:
    """Make the database say what ``plan`` says, in one transaction and at most one publish.

    A dry run applies everything inside the transaction (so the models' own validation
    and the database constraints have their say) and then rolls it back.
    """
    applier = _Applier(actor=actor)
    applier.result.dry_run = dry_run
    try:
        with policy_batch(actor=actor, reason=reason):
            applier.apply(plan)
            # Nothing changed: roll back too, so that not even a publish is attempted.
            if applier.problems or dry_run or applier.result.is_unchanged:
                raise _Rollback
    except _Rollback:
        pass
    except IntegrityError as error:
        # Only a concurrent edit can get here: the file was checked against what was read.
        raise PolicyFileError(
            [f"the database changed while loading ({error}); nothing was changed, try again"]
        ) from None
    if applier.problems:
        raise PolicyFileError(applier.problems)
    return applier.result


def policy_load(
    *,
    text: str,
    actor: Actor,
    reason: str,
    file_format: str | None = None,
    dry_run: bool = False,
) -> LoadResult:
    """Parse, validate and apply a policy file; nothing is written unless all of it is valid."""
    plan = policy_validate(policy_parse(text=text, file_format=file_format))
    return policy_apply(plan=plan, actor=actor, reason=reason, dry_run=dry_run)


# --- dumping ---------------------------------------------------------------------------


class _FlowMapping(dict[str, Any]):
    """Written on one line in YAML, like the rules in DESIGN's sample."""


class _QuotedText(str):
    """Written in double quotes in YAML: prices and costs, so they are never read as floats."""

    __slots__ = ()


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key, as DESIGN's sample and most hand-written YAML do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow=flow, indentless=False)


_Dumper.add_representer(
    _FlowMapping,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)
_Dumper.add_representer(
    _QuotedText,
    lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"'),
)


def _decimal_text(value: Decimal, *, min_places: int) -> _QuotedText:
    """Trailing zeros dropped down to ``min_places``: 0.002500 → "0.0025", 800.0000 → "800.00"."""
    text = format(value, "f")
    if "." in text:
        whole, fraction = text.split(".")
        fraction = fraction.rstrip("0").ljust(min_places, "0")
        text = f"{whole}.{fraction}" if fraction else whole
    elif min_places:
        text = f"{text}.{'0' * min_places}"
    return _QuotedText(text)


def _rule_out(rule: LimitRule, *, is_capacity: bool = False) -> _FlowMapping:
    out = _FlowMapping()
    if not is_capacity:
        out["scope"] = rule.scope
    out["metric"] = rule.metric
    out["limit"] = rule.limit
    if rule.window_seconds is not None:
        out["window"] = rule.window_seconds
    if rule.model_class is not None and not is_capacity:
        out["model_class"] = rule.model_class.name
    if rule.is_shadow:
        out["shadow"] = True
    return out


def policy_document() -> dict[str, list[dict[str, Any]]]:
    """The whole quota model as a policy file's data, in a fixed order."""
    rules_by_owner: dict[tuple[str, int | None], list[LimitRule]] = {}
    for rule in LimitRule.objects.select_related("model_class"):
        owner: tuple[str, int | None]
        if rule.tenant_id is not None:
            owner = ("tenant", rule.tenant_id)
        elif rule.tier_id is not None:
            owner = ("tier", rule.tier_id)
        else:
            owner = ("class", rule.model_class_id)
        rules_by_owner.setdefault(owner, []).append(rule)
    models_by_class: dict[int, list[AIModel]] = {}
    for ai_model in AIModel.objects.all():
        models_by_class.setdefault(ai_model.model_class_id, []).append(ai_model)
    budgets_by_tenant: dict[int, list[Budget]] = {}
    for budget in Budget.objects.all():
        budgets_by_tenant.setdefault(budget.tenant_id, []).append(budget)

    def rules_of(kind: str, pk: int) -> list[LimitRule]:
        return sorted(rules_by_owner.get((kind, pk), []), key=rule_sort_key)

    model_classes = []
    for model_class in sorted(ModelClass.objects.all(), key=lambda item: item.name):
        out: dict[str, Any] = {"name": model_class.name}
        if model_class.description:
            out["description"] = model_class.description
        capacity = rules_of("class", model_class.pk)
        if capacity:
            out["capacity"] = [_rule_out(rule, is_capacity=True) for rule in capacity]
        class_models = sorted(models_by_class.get(model_class.pk, []), key=lambda m: m.model_id)
        if class_models:
            out["models"] = [_model_out(ai_model) for ai_model in class_models]
        model_classes.append(out)

    default_priority = Tier._meta.get_field("priority").get_default()
    tiers = []
    for tier in sorted(Tier.objects.all(), key=lambda item: item.name):
        out = {"name": tier.name}
        if tier.description:
            out["description"] = tier.description
        out["fail_mode"] = tier.fail_mode
        if tier.priority != default_priority:
            out["priority"] = tier.priority
        limits = rules_of("tier", tier.pk)
        if limits:
            out["limits"] = [_rule_out(rule) for rule in limits]
        tiers.append(out)

    tenants = []
    for tenant in sorted(Tenant.objects.select_related("tier"), key=lambda item: item.slug):
        out = {"slug": tenant.slug, "name": tenant.name, "tier": tenant.tier.name}
        if not tenant.is_active:
            out["active"] = False
        limits = rules_of("tenant", tenant.pk)
        if limits:
            out["limits"] = [_rule_out(rule) for rule in limits]
        budgets = sorted(
            budgets_by_tenant.get(tenant.pk, []),
            key=lambda budget: BudgetPeriod.values.index(budget.period),
        )
        if budgets:
            out["budgets"] = [_budget_out(budget) for budget in budgets]
        tenants.append(out)
    return {"model_classes": model_classes, "tiers": tiers, "tenants": tenants}


def _model_out(ai_model: AIModel) -> _FlowMapping:
    out = _FlowMapping(
        id=ai_model.model_id,
        input_price_per_1k=_decimal_text(ai_model.input_price_per_1k, min_places=4),
        output_price_per_1k=_decimal_text(ai_model.output_price_per_1k, min_places=4),
    )
    if not ai_model.is_active:
        out["active"] = False
    return out


def _budget_out(budget: Budget) -> _FlowMapping:
    out = _FlowMapping(period=budget.period)
    if budget.token_limit is not None:
        out["tokens"] = budget.token_limit
    if budget.cost_limit is not None:
        out["cost"] = _decimal_text(budget.cost_limit, min_places=2)
    out["hard"] = budget.is_hard
    if budget.alert_thresholds:
        out["alert_at"] = list(budget.alert_thresholds)
    return out


def policy_dump(*, file_format: str = "yaml") -> str:
    """The whole quota model as a policy file; loading it back changes nothing."""
    document = policy_document()
    if file_format == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    sections = [
        yaml.dump(
            {key: document[key]},
            Dumper=_Dumper,
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=10_000,
        )
        for key in SECTIONS
    ]
    return "\n".join(sections)
