"""Policy files: loadpolicy validates the whole file, applies it in one audited batch and is
idempotent; dumppolicy writes the same format back, byte-stable."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

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
from limits.policyfile import (
    ModelClassSpec,
    PolicyFileError,
    PolicyPlan,
    RuleSpec,
    policy_apply,
)
from limits.services import Actor
from tests.factories import BudgetFactory, LimitRuleFactory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policy.yaml"

# DESIGN.md's sample, verbatim.
DESIGN_SAMPLE = """\
model_classes:
  - name: frontier
    capacity: [{metric: requests, limit: 5000, window: 60}]   # scope global
    models:
      - {id: gpt-4o, input_price_per_1k: "0.0025", output_price_per_1k: "0.0100"}
  - name: small
    models:
      - {id: llama-3-8b, input_price_per_1k: "0.0001", output_price_per_1k: "0.0002"}
tiers:
  - name: free
    fail_mode: closed
    limits:
      - {scope: user_model, metric: requests, limit: 100, window: 3600}
      - {scope: user_model, metric: tokens, limit: 50000, window: 3600, model_class: frontier}
      - {scope: tenant, metric: tokens, limit: 1000000, window: 86400}
      - {scope: user, metric: concurrency, limit: 4}
tenants:
  - slug: acme
    name: Acme Corp
    tier: free
    limits:
      - {scope: user_model, metric: requests, limit: 500, window: 3600}
    budgets:
      - {period: month, tokens: 20000000, cost: "800.00", hard: true, alert_at: [80, 100]}
"""

DESIGN_SAMPLE_DUMP = """\
model_classes:
  - name: frontier
    capacity:
      - {metric: requests, limit: 5000, window: 60}
    models:
      - {id: gpt-4o, input_price_per_1k: "0.0025", output_price_per_1k: "0.0100"}
  - name: small
    models:
      - {id: llama-3-8b, input_price_per_1k: "0.0001", output_price_per_1k: "0.0002"}

tiers:
  - name: free
    fail_mode: closed
    limits:
      - {scope: user_model, metric: requests, limit: 100, window: 3600}
      - {scope: user_model, metric: tokens, limit: 50000, window: 3600, model_class: frontier}
      - {scope: user, metric: concurrency, limit: 4}
      - {scope: tenant, metric: tokens, limit: 1000000, window: 86400}

tenants:
  - slug: acme
    name: Acme Corp
    tier: free
    limits:
      - {scope: user_model, metric: requests, limit: 500, window: 3600}
    budgets:
      - {period: month, tokens: 20000000, cost: "800.00", hard: true, alert_at: [80, 100]}
"""

QUOTA_MODELS = (
    ModelClass,
    AIModel,
    Tier,
    Tenant,
    LimitRule,
    Budget,
    ApiKey,
    PolicyVersion,
    AuditEntry,
)


def snapshot() -> dict[str, list[dict[str, object]]]:
    return {model.__name__: list(model.objects.order_by("pk").values()) for model in QUOTA_MODELS}


def load(path: Path | str, *args: str) -> str:
    out = io.StringIO()
    call_command("loadpolicy", str(path), *args, stdout=out)
    return out.getvalue()


def dump(*args: str) -> str:
    out = io.StringIO()
    call_command("dumppolicy", *args, stdout=out)
    return out.getvalue()


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def published(django_capture_on_commit_callbacks):
    """Runs the on-commit publish that a real (non-test) transaction would run."""

    def run(path: Path | str, *args: str) -> str:
        with django_capture_on_commit_callbacks(execute=True):
            return load(path, *args)

    return run


# --- round trips -----------------------------------------------------------------------


def test_design_sample_dumps_in_the_same_format_and_round_trips_byte_identical(
    db, tmp_path, published
):
    published(write(tmp_path, DESIGN_SAMPLE))
    first = dump()
    assert first == DESIGN_SAMPLE_DUMP

    output = published(write(tmp_path, first, "dump.yaml"))

    assert output == "dump.yaml: nothing changed; the database already matches the file.\n"
    assert dump() == first


def test_design_sample_creates_every_object_it_names(db, tmp_path, published):
    published(write(tmp_path, DESIGN_SAMPLE))

    acme = Tenant.objects.get(slug="acme")
    assert (acme.name, acme.tier.name, acme.is_active) == ("Acme Corp", "free", True)
    assert AIModel.objects.get(model_id="gpt-4o").input_price_per_1k == Decimal("0.0025")
    capacity = LimitRule.objects.get(scope="global")
    assert (capacity.model_class.name, capacity.limit, capacity.window_seconds) == (
        "frontier",
        5000,
        60,
    )
    concurrency = LimitRule.objects.get(tier__name="free", metric="concurrency")
    assert (concurrency.scope, concurrency.limit, concurrency.window_seconds) == ("user", 4, None)
    budget = Budget.objects.get(tenant=acme)
    assert (budget.period, budget.token_limit, budget.cost_limit, budget.is_hard) == (
        "month",
        20_000_000,
        Decimal("800.0000"),
        True,
    )
    assert budget.alert_thresholds == [80, 100]
    assert PolicyVersion.objects.count() == 1
    assert AuditEntry.objects.filter(actor_label="loadpolicy").count() == 13


def test_example_policy_loads_and_round_trips_byte_identical(db, tmp_path, published):
    published(EXAMPLE)
    first = dump()
    published(write(tmp_path, first, "dump.yaml"))

    assert dump() == first
    assert set(Tier.objects.values_list("name", "fail_mode")) == {
        ("internal", "open"),
        ("premium", "local"),
        ("standard", "closed"),
        ("free", "closed"),
    }
    assert sorted(Tenant.objects.values_list("slug", flat=True)) == [
        "acme",
        "globex",
        "initech",
        "research",
    ]


def test_json_dump_loads_back_without_changes(db, tmp_path, published):
    published(EXAMPLE)
    audit_rows = AuditEntry.objects.count()

    output = published(write(tmp_path, dump("--format", "json"), "policy.json"))

    assert output == "policy.json: nothing changed; the database already matches the file.\n"
    assert AuditEntry.objects.count() == audit_rows


def test_policy_can_be_read_from_standard_input(db, monkeypatch, published):
    monkeypatch.setattr("sys.stdin", io.StringIO(DESIGN_SAMPLE))

    output = published("-")

    assert output.endswith(
        "standard input: loaded and published (13 created, 0 changed, 0 deleted).\n"
    )
    assert Tenant.objects.filter(slug="acme").exists()


# --- idempotence and updates -----------------------------------------------------------


def test_loading_the_same_file_twice_writes_no_audit_row_and_no_policy_version(db, published):
    published(EXAMPLE)
    before = snapshot()

    output = published(EXAMPLE)

    assert output == "policy.yaml: nothing changed; the database already matches the file.\n"
    assert snapshot() == before


def test_changing_one_limit_writes_one_audit_row_and_one_policy_version(db, tmp_path, published):
    published(write(tmp_path, DESIGN_SAMPLE))
    rule = LimitRule.objects.get(tier__name="free", scope="tenant", metric="tokens")
    audit_ids = set(AuditEntry.objects.values_list("pk", flat=True))
    versions = PolicyVersion.objects.count()
    changed = DESIGN_SAMPLE.replace(
        "{scope: tenant, metric: tokens, limit: 1000000, window: 86400}",
        "{scope: tenant, metric: tokens, limit: 2500000, window: 1d}",
    )

    output = published(write(tmp_path, changed))

    new_entries = list(AuditEntry.objects.exclude(pk__in=audit_ids))
    assert len(new_entries) == 1
    entry = new_entries[0]
    assert (entry.action, entry.target_type, entry.target_id, entry.actor_label) == (
        "changed",
        "limitrule",
        str(rule.pk),
        "loadpolicy",
    )
    assert entry.changes == {"limit": [1_000_000, 2_500_000]}
    assert PolicyVersion.objects.count() == versions + 1
    latest = PolicyVersion.objects.latest()
    assert (latest.actor_label, latest.reason) == ("loadpolicy", "loadpolicy policy.yaml")
    assert entry.policy_version == latest.version
    rule.refresh_from_db()
    assert rule.limit == 2_500_000
    assert output == (
        "  changed tier free rule tenant tokens per 1d: limit 1000000 → 2500000\n"
        "policy.yaml: loaded and published (0 created, 1 changed, 0 deleted).\n"
    )


def test_a_rule_missing_from_the_file_is_deleted_and_audited(db, tmp_path, published):
    published(write(tmp_path, DESIGN_SAMPLE))
    rule = LimitRule.objects.get(tier__name="free", metric="concurrency")
    without = DESIGN_SAMPLE.replace("      - {scope: user, metric: concurrency, limit: 4}\n", "")

    output = published(write(tmp_path, without))

    assert not LimitRule.objects.filter(pk=rule.pk).exists()
    entry = AuditEntry.objects.get(action="deleted")
    assert (entry.target_type, entry.target_id) == ("limitrule", str(rule.pk))
    assert entry.changes["limit"] == [4, None]
    assert "  deleted tier free rule user concurrency 4\n" in output


def test_changing_a_window_replaces_the_rule_because_the_window_is_its_identity(
    db, tmp_path, published
):
    published(write(tmp_path, DESIGN_SAMPLE))
    old = LimitRule.objects.get(tenant__slug="acme")
    changed = DESIGN_SAMPLE.replace("limit: 500, window: 3600", "limit: 500, window: 15m")

    published(write(tmp_path, changed))

    new = LimitRule.objects.get(tenant__slug="acme")
    assert new.pk != old.pk
    assert (new.limit, new.window_seconds) == (500, 900)


def test_budgets_and_capacity_become_exactly_what_the_file_says(db, tmp_path, published):
    published(write(tmp_path, DESIGN_SAMPLE))
    changed = DESIGN_SAMPLE.replace(
        "    capacity: [{metric: requests, limit: 5000, window: 60}]   # scope global\n", ""
    ).replace(
        '{period: month, tokens: 20000000, cost: "800.00", hard: true, alert_at: [80, 100]}',
        "{period: day, cost: 12.5, hard: false, alert_at: [100, 50, 50]}",
    )

    published(write(tmp_path, changed))

    assert not LimitRule.objects.filter(scope="global").exists()
    budget = Budget.objects.get(tenant__slug="acme")
    assert (budget.period, budget.token_limit, budget.cost_limit, budget.is_hard) == (
        "day",
        None,
        Decimal("12.5000"),
        False,
    )
    assert budget.alert_thresholds == [50, 100]
    assert '{period: day, cost: "12.50", hard: false, alert_at: [50, 100]}' in dump()


def test_entities_not_in_the_file_are_left_untouched(world, tmp_path, published):
    BudgetFactory(tenant=world.bob)
    bob_before = Tenant.objects.filter(slug="bob").values().get()
    rules_before = list(LimitRule.objects.filter(tier=world.tier).values())
    text = """\
tenants:
  - {slug: alice, name: Alice Laboratories, tier: standard}
"""

    published(write(tmp_path, text))

    assert Tenant.objects.get(slug="alice").name == "Alice Laboratories"
    assert Tenant.objects.filter(slug="bob").values().get() == bob_before
    assert Budget.objects.filter(tenant=world.bob).count() == 1
    assert list(LimitRule.objects.filter(tier=world.tier).values()) == rules_before
    assert AIModel.objects.count() == 2


def test_a_model_moves_to_the_class_the_file_puts_it_in(world, tmp_path, published):
    text = """\
model_classes:
  - name: frontier
    models:
      - {id: llama-3-8b, input_price_per_1k: 0.0004, output_price_per_1k: 0.0008}
"""

    output = published(write(tmp_path, text))

    llama = AIModel.objects.get(model_id="llama-3-8b")
    assert llama.model_class == world.frontier
    assert llama.input_price_per_1k == Decimal("0.000400")
    assert AIModel.objects.get(model_id="gpt-4o").model_class == world.frontier
    assert "  changed AI model llama-3-8b: model_class small → frontier, " in output


def test_look_alike_model_ids_and_names_update_the_existing_rows(world, tmp_path, published):
    text = """\
model_classes:
  - name: FRONTIER
    models:
      - {id: "ｇｐｔ－４ｏ", input_price_per_1k: "0.0030", output_price_per_1k: "0.0100"}
tenants:
  - {slug: " Alice ", name: Alice Labs, tier: Standard}
"""

    published(write(tmp_path, text))

    assert list(AIModel.objects.values_list("model_id", flat=True)) == ["gpt-4o", "llama-3-8b"]
    assert AIModel.objects.get(model_id="gpt-4o").input_price_per_1k == Decimal("0.003")
    assert ModelClass.objects.count() == 2
    assert Tenant.objects.count() == 2


def test_dry_run_lists_the_changes_and_writes_nothing(world, tmp_path, published):
    before = snapshot()

    output = published(write(tmp_path, DESIGN_SAMPLE), "--dry-run")

    assert snapshot() == before
    assert "  would create tier free\n" in output
    assert "  would create tenant acme rule user_model requests per 1h\n" in output
    assert output.endswith(
        "policy.yaml: dry run, nothing was written (would be 9 created, 1 changed, 0 deleted).\n"
    )


def test_api_keys_and_existing_override_rules_of_unlisted_tenants_survive(
    world, tmp_path, published
):
    override = LimitRuleFactory(tier=None, tenant=world.bob, limit=7)

    published(write(tmp_path, DESIGN_SAMPLE))

    assert LimitRule.objects.filter(pk=override.pk, limit=7).exists()
    assert LimitRule.objects.filter(pk=world.rule.pk).exists()


# --- invalid files ---------------------------------------------------------------------

TWO_TIERS = """\
tiers:
  - name: free
    limits:
      - {{scope: user_model, metric: requests, limit: 100, window: 3600}}
  - name: pro
    limits:
      - {rule}
"""


def one_rule(rule: str) -> str:
    return TWO_TIERS.format(rule=rule)


CLASSES = """\
model_classes:
  - name: frontier
    models:
      - {{id: gpt-4o, input_price_per_1k: "0.0025", output_price_per_1k: "0.0100"}}
      - {{id: o1, input_price_per_1k: {input}, output_price_per_1k: {output}}}
"""

INVALID_FILES = {
    "window of zero": (
        one_rule("{scope: user, metric: requests, limit: 10, window: 0}"),
        "tiers[1].limits[0].window: must be at least 1 second",
    ),
    "window in words": (
        one_rule("{scope: user, metric: requests, limit: 10, window: 15 minutes}"),
        "tiers[1].limits[0].window: must be whole seconds or a duration like 30s, 15m, 1h, 1d, "
        'not text "15 minutes"',
    ),
    "missing window": (
        one_rule("{scope: user, metric: tokens, limit: 10}"),
        "tiers[1].limits[0].window: is required for tokens limits",
    ),
    "negative limit": (
        one_rule("{scope: user, metric: requests, limit: -5, window: 60}"),
        "tiers[1].limits[0].limit: must be a whole number ≥ 1",
    ),
    "limit as text": (
        one_rule('{scope: user, metric: requests, limit: "100", window: 60}'),
        'tiers[1].limits[0].limit: must be a whole number ≥ 1, not text "100"',
    ),
    "float limit": (
        one_rule("{scope: user, metric: requests, limit: 10.5, window: 60}"),
        "tiers[1].limits[0].limit: must be a whole number ≥ 1, not the number 10.5",
    ),
    "bool limit": (
        one_rule("{scope: user, metric: requests, limit: true, window: 60}"),
        "tiers[1].limits[0].limit: must be a whole number ≥ 1, not true",
    ),
    "unknown scope": (
        one_rule("{scope: organisation, metric: requests, limit: 10, window: 60}"),
        'tiers[1].limits[0].scope: unknown scope "organisation"; expected one of user_model, '
        "user, tenant_model, tenant",
    ),
    "global scope on a tier": (
        one_rule("{scope: global, metric: requests, limit: 10, window: 60}"),
        "tiers[1].limits[0].scope: global capacity belongs to a model class; write it under "
        "model_classes[].capacity",
    ),
    "unknown metric": (
        one_rule("{scope: user, metric: bytes, limit: 10, window: 60}"),
        'tiers[1].limits[0].metric: unknown metric "bytes"; expected one of requests, tokens, '
        "concurrency",
    ),
    "concurrency with a window": (
        one_rule("{scope: user, metric: concurrency, limit: 4, window: 60}"),
        "tiers[1].limits[0].window: concurrency limits have no window; leave it out",
    ),
    "unknown model class": (
        one_rule("{scope: user, metric: tokens, limit: 10, window: 60, model_class: huge}"),
        'tiers[1].limits[0].model_class: unknown model class "huge"',
    ),
    "unknown key": (
        one_rule("{scope: user, metric: requests, limit: 10, windw: 60}"),
        'tiers[1].limits[0].windw: unknown key; did you mean "window"? (expected scope, '
        "metric, limit, window, model_class, shadow)",
    ),
    "duplicate rule written two ways": (
        one_rule("{rule}").replace(
            "      - {rule}\n",
            "      - {scope: user, metric: requests, limit: 10, window: 1h}\n"
            "      - {scope: user, metric: requests, limit: 20, window: 3600}\n",
        ),
        "tiers[1].limits[1]: duplicate rule: same scope, metric, model class and window as "
        "tiers[1].limits[0]",
    ),
    "duplicate tier": (
        one_rule("{rule}")
        .replace("name: pro", "name: FREE")
        .replace(
            "      - {rule}\n", "      - {scope: user, metric: requests, limit: 10, window: 60}\n"
        ),
        'tiers[1].name: duplicate tier "free" (also tiers[0])',
    ),
    "bad fail mode": (
        "tiers:\n  - {name: free, fail_mode: maybe}\n",
        'tiers[0].fail_mode: unknown fail mode "maybe"; expected one of open, closed, local',
    ),
    "unknown tier": (
        "tenants:\n  - {slug: acme, name: Acme Corp, tier: gold}\n",
        'tenants[0].tier: unknown tier "gold"',
    ),
    "tenant name as a number": (
        "tenants:\n  - {slug: acme, name: 42, tier: premium}\n",
        "tenants[0].name: must be text, not the number 42",
    ),
    "control character in a description": (
        'tiers:\n  - {name: free, description: "trial\\0accounts"}\n',
        "tiers[0].description: must contain only printable characters, tabs and line breaks",
    ),
    "missing tenant name": (
        "tenants:\n  - {slug: acme, tier: premium}\n",
        "tenants[0].name: is required",
    ),
    "negative price": (
        CLASSES.format(input='"-0.01"', output='"0.06"'),
        "model_classes[0].models[1].input_price_per_1k: must be a decimal number ≥ 0",
    ),
    "price in words": (
        CLASSES.format(input="cheap", output='"0.06"'),
        "model_classes[0].models[1].input_price_per_1k: must be a decimal number ≥ 0, "
        'not text "cheap"',
    ),
    "price with too many decimals": (
        CLASSES.format(input='"0.015"', output='"0.0600001"'),
        "model_classes[0].models[1].output_price_per_1k: must have at most 6 decimal places",
    ),
    "look-alike duplicate model id": (
        CLASSES.format(input='"0.015"', output='"0.06"')
        + "  - name: other\n    models:\n"
        + '      - {id: "ｇｐｔ－４ｏ", input_price_per_1k: "1", output_price_per_1k: "1"}\n',
        'model_classes[1].models[0].id: duplicate model id "gpt-4o" '
        "(also model_classes[0].models[0])",
    ),
    "bad model id": (
        CLASSES.format(input='"0.015"', output='"0.06"').replace("id: o1", 'id: "o 1"'),
        "model_classes[0].models[1].id: may contain only letters, digits and . _ : / @ + -, "
        "starting with a letter or digit",
    ),
    "capacity with a scope": (
        "model_classes:\n  - name: frontier\n    capacity:\n"
        "      - {scope: tenant, metric: requests, limit: 10, window: 60}\n",
        "model_classes[0].capacity[0].scope: capacity rules are global (every tenant on this "
        "class); leave scope out or write global",
    ),
    "budget without an amount": (
        "tenants:\n  - slug: acme\n    name: Acme\n    tier: premium\n"
        "    budgets: [{period: month, hard: true}]\n",
        "tenants[0].budgets[0]: a budget needs tokens, cost or both",
    ),
    "two budgets for one period": (
        "tenants:\n  - slug: acme\n    name: Acme\n    tier: premium\n"
        "    budgets: [{period: month, tokens: 10}, {period: month, cost: 5}]\n",
        'tenants[0].budgets[1].period: duplicate budget period "month" '
        "(also tenants[0].budgets[0])",
    ),
    "alert threshold out of range": (
        "tenants:\n  - slug: acme\n    name: Acme\n    tier: premium\n"
        "    budgets: [{period: month, tokens: 10, alert_at: [80, 0]}]\n",
        "tenants[0].budgets[0].alert_at[1]: must be a whole number ≥ 1",
    ),
    "list where a mapping goes": (
        "tiers:\n  - [free, closed]\n",
        "tiers[0]: must be a mapping of keys to values, not a list",
    ),
    "unknown top-level key": (
        "tiers: []\ntenant:\n  - {slug: acme}\n",
        "tenant: unknown key (expected model_classes, tiers, tenants)",
    ),
    "top level not a mapping": (
        "- name: free\n",
        "the top level must be a mapping with model_classes, tiers, tenants, not a list",
    ),
    "no section at all": ("{}\n", "the file needs at least one of model_classes, tiers, tenants"),
    "empty file": ("\n  \n", "the file is empty"),
    "only comments": ("# nothing yet\n", "the file is empty (nothing but comments)"),
    "bad YAML": (
        "tiers:\n  - name: free\n    limits: [{scope: user\n",
        "not valid YAML: line 4, column 1: expected ',' or '}', but got '<stream end>'",
    ),
    "key written twice": (
        "tiers:\n  - {name: free}\ntiers:\n  - {name: pro}\n",
        "not valid YAML: line 3, column 1: found the key 'tiers' twice",
    ),
}


@pytest.mark.parametrize(("text", "problem"), list(INVALID_FILES.values()), ids=list(INVALID_FILES))
def test_invalid_file_is_refused_with_its_path_and_changes_nothing(
    db, tmp_path, published, text, problem
):
    published(EXAMPLE)
    before = snapshot()

    with pytest.raises(CommandError) as raised:
        published(write(tmp_path, text, "bad.yaml"))

    lines = str(raised.value).splitlines()
    assert lines[0].startswith("bad.yaml: ")
    assert lines[0].endswith(", nothing was changed")
    assert problem in lines[1:]
    assert snapshot() == before


def test_invalid_json_names_line_and_column(db, tmp_path):
    with pytest.raises(CommandError) as raised:
        load(write(tmp_path, '{"tiers": [\n  {"name": "free",}\n]}\n', "bad.json"))

    assert str(raised.value).splitlines() == [
        "bad.json: 1 problem, nothing was changed",
        "not valid JSON: line 2, column 19: Expecting property name enclosed in double quotes",
    ]


def test_every_problem_in_a_file_is_listed_at_once(db, tmp_path):
    text = """\
tiers:
  - name: free
    fail_mode: sometimes
    limits:
      - {scope: user, metric: requests, limit: 0, window: 60}
tenants:
  - {slug: acme, name: Acme Corp, tier: gold, active: "yes"}
"""

    with pytest.raises(CommandError) as raised:
        load(write(tmp_path, text))

    assert str(raised.value).splitlines() == [
        "policy.yaml: 4 problems, nothing was changed",
        'tiers[0].fail_mode: unknown fail mode "sometimes"; expected one of open, closed, local',
        "tiers[0].limits[0].limit: must be a whole number ≥ 1",
        'tenants[0].tier: unknown tier "gold"',
        'tenants[0].active: must be true or false, not text "yes"',
    ]
    assert not Tier.objects.exists()


def test_a_tier_already_in_the_database_may_be_named_by_a_tenant(world, tmp_path, published):
    published(write(tmp_path, "tenants:\n  - {slug: carol, name: Carol, tier: standard}\n"))

    assert Tenant.objects.get(slug="carol").tier == world.tier


def test_a_model_level_error_found_while_applying_is_reported_with_its_path_and_rolled_back(
    world,
):
    """The model's own full_clean() is the last word, even for a plan the file checks passed."""
    before = snapshot()
    capacity = RuleSpec(
        path="model_classes[0].capacity[0]",
        scope="global",
        metric="concurrency",
        limit=10,
        window=60,
        model_class="gpu",
        shadow=False,
    )
    plan = PolicyPlan(
        model_classes=[
            ModelClassSpec("model_classes[0]", "gpu", "", capacity=[capacity], models=[])
        ],
        tiers=[],
        tenants=[],
    )

    with pytest.raises(PolicyFileError) as raised:
        policy_apply(plan=plan, actor=Actor(label="test"), reason="test")

    assert raised.value.problems == [
        "model_classes[0].capacity[0].window: concurrency limits have no window; leave it empty"
    ]
    assert snapshot() == before


def test_loadpolicy_process_exits_non_zero_with_the_problem_on_stderr(db, tmp_path):
    settings = connection.settings_dict
    database_url = (
        f"postgres://{settings['USER']}:{settings['PASSWORD'] or ''}@{settings['HOST']}:"
        f"{settings['PORT'] or 5432}/{settings['NAME']}"
    )
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url,
    }
    bad = write(tmp_path, "tenants:\n  - {slug: acme, name: Acme Corp, tier: gold}\n")

    finished = subprocess.run(
        [sys.executable, "manage.py", "loadpolicy", str(bad)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 1
    assert finished.stdout == ""
    assert finished.stderr.splitlines() == [
        "CommandError: policy.yaml: 1 problem, nothing was changed",
        'tenants[0].tier: unknown tier "gold"',
    ]
    assert not Tenant.objects.exists()


def test_a_missing_file_is_a_clear_error(db, tmp_path):
    with pytest.raises(CommandError, match=r"^cannot read .*nowhere\.yaml: "):
        load(tmp_path / "nowhere.yaml")
