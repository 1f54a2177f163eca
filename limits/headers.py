"""Rate-limit headers of a decision.

``RateLimit-Policy`` and ``RateLimit`` follow draft-ietf-httpapi-ratelimit-headers (the
structured-field form: ``"name";q=100;w=3600;qu="requests"`` and ``"name";r=42;t=17``).
Each enforced limit is one item named ``<scope>.<metric>.<window>`` (``user_model.
requests.3600``, ``user.concurrency``, ``budget.tokens.month``). Quota units: request
limits ``requests``, concurrency ``concurrent-requests``, token limits and token budgets
``tokens`` (our extension; the draft allows new units). Money budgets have no integer
quota and are left out of the headers; the body carries them.

For clients written against OpenAI's API, the tightest request limit and the tightest
token limit also go out as ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, the
reset as a duration like ``6m0s`` or ``20ms``.
"""

from __future__ import annotations

import math

from limits.engine import Decision, LimitState

UNITS = {"requests": "requests", "concurrency": "concurrent-requests", "tokens": "tokens"}


def _name(state: LimitState) -> str:
    parts = [state.scope, state.metric]
    if state.window is not None:
        parts.append(str(state.window))
    if state.model_class:
        parts.append(state.model_class)
    return ".".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    policies: list[str] = []
    states: list[str] = []
    tightest: dict[str, LimitState] = {}
    for state in decision.limits:
        unit = UNITS.get(state.metric)
        if unit is None:
            continue
        name = _name(state)
        policy = f'"{name}";q={int(state.limit)}'
        if isinstance(state.window, int):
            policy += f";w={state.window}"
        policy += f';qu="{unit}"'
        policies.append(policy)
        states.append(f'"{name}";r={int(state.remaining)};t={math.ceil(state.reset)}')
        if state.metric in ("requests", "tokens"):
            best = tightest.get(state.metric)
            if best is None or state.remaining < best.remaining:
                tightest[state.metric] = state
    headers: dict[str, str] = {}
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(states)
    for metric, state in tightest.items():
        headers[f"x-ratelimit-limit-{metric}"] = str(int(state.limit))
        headers[f"x-ratelimit-remaining-{metric}"] = str(int(state.remaining))
        headers[f"x-ratelimit-reset-{metric}"] = _duration(state.reset)
    if not decision.allowed and decision.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers
