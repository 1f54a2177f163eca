"""The finance pages in a real browser: headless Chromium (Debian's ``chromium``, started
by the test on loopback) logs in as a finance user through the admin login, opens
``/billing/`` and a statement, finds the charts drawn and no console errors, and saves
screenshots under the test run's artifacts (``TEST_ARTIFACTS_DIR``, default
``var/test-artifacts``)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from billing.ingest import drain
from limits import engine
from tests.billing.browser import chromium, chromium_path
from tests.billing.conftest import publish
from tests.factories import BudgetFactory, UserFactory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # scripts/test runs scripts/setup --test first, which installs chromium wherever apt-get
    # may be used: the test is skipped only where it could not (setup said why).
    pytest.mark.skipif(
        chromium_path() is None,
        reason="Chromium is not installed and scripts/setup --test could not install it here "
        "(Debian's chromium package needs apt-get as root or with password-less sudo; its "
        "output says which was missing)",
    ),
]

REPOSITORY = Path(__file__).resolve().parents[2]


def artifacts() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPOSITORY / "var" / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_finance_user_sees_the_charts_and_a_statement_in_chromium(
    world, live_server, settings, tmp_path
):
    now = dt.datetime.now(dt.UTC)
    publish()
    BudgetFactory(tenant=world.alice, token_limit=400_000, alert_thresholds=[50])
    for day in range(6):
        settings.QUOTA_TEST_NOW_US = int((now - dt.timedelta(days=day)).timestamp() * 1e6)
        for tenant, model, used in (
            (world.alice, "gpt-4o", 20_000 + 3_000 * day),
            (world.alice, "llama-3-8b", 50_000),
            (world.bob, "gpt-4o", 9_000 * (day + 1)),
        ):
            decision = engine.check(tenant.pk, f"user{day % 3}", model, tokens=used)
            engine.commit(tenant.pk, decision.request_id, used // 2, used // 4)
    settings.QUOTA_TEST_NOW_US = None
    drain()
    UserFactory(username="fiona", groups=["finance"])  # password "pw"

    base = live_server.url
    assert base.startswith("http://localhost:") or base.startswith("http://127.0.0.1:")
    base = base.replace("localhost", "127.0.0.1")
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    shots = artifacts()
    with chromium(tmp_path / "profile") as page:
        page.navigate(f"{base}/billing/")
        assert "/admin/login/" in page.evaluate("location.pathname")
        page.submit_and_wait(
            "document.querySelector('#id_username').value = 'fiona';"
            "document.querySelector('#id_password').value = 'pw';"
            "document.querySelector('#login-form').submit();"
        )
        assert page.evaluate("location.pathname") == "/billing/"
        # From here on only the billing pages speak (the admin login page before them asks
        # for /favicon.ico, which nothing serves).
        page.events.clear()
        page.navigate(f"{base}/billing/")

        charts = json.loads(
            page.evaluate(
                """JSON.stringify([...document.querySelectorAll('svg.chart')].map(svg => {
                    const box = svg.getBoundingClientRect();
                    const drawn = [...svg.querySelectorAll('rect.bar, polyline.line')]
                        .filter(shape => { const b = shape.getBBox();
                                           return b.width > 0 && b.height >= 0; });
                    return {width: box.width, height: box.height, shapes: drawn.length,
                            label: svg.getAttribute('aria-label')};
                }))"""
            )
        )
        labels = [chart["label"] for chart in charts]
        assert labels[:3] == ["Spend per tenant", "Spend per model", "Share of checks denied"]
        assert any("budget left" in label for label in labels)
        for chart in charts:
            assert chart["width"] > 200 and chart["height"] > 60, chart
            assert chart["shapes"] > 0, chart
        assert page.evaluate("document.querySelectorAll('#top-tenants tbody tr').length") == 2
        page.screenshot(shots / "billing-overview.png")

        month = f"{now:%Y-%m}"
        page.navigate(f"{base}/billing/statements/alice/{month}/")
        assert page.evaluate("document.querySelectorAll('#statement tr.line').length") == 2
        total = page.evaluate("document.querySelector('#total').textContent")
        assert total.replace(",", "").replace(".", "").isdigit()
        page.screenshot(shots / "billing-statement.png")

        assert page.errors() == []
    for name in ("billing-overview.png", "billing-statement.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    engine.reset_state()
