"""The ledger write on PostgreSQL: one batch of stream entries, set-based.

Python does what it can do before the transaction, on the thread that reads the streams
while the previous batch is written: it parses the entries, settles each check with its
commit when both are in the batch, and lays the result out as ``COPY`` text, one row per
check and one per commit left over. In the transaction, the rows are copied into two
temporary tables and one statement does the rest: it prices the checks at the price in force
when they happened, inserts those not stored yet (unique on tenant and stream entry id),
amends checks stored before with the commits left over, keeps commits whose check has not
arrived in ``PendingCommit``, moves the hourly, daily and monthly rollups by exactly what was
inserted or amended (``INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE``), appends what
the top-user rollups gain to ``UserUsageDelta`` (folded in by ``user_rollups_fold``), and
records statement adjustments for months already finalised. Commits that waited in
``PendingCommit`` are tried by a second run of the statement, once the batch's checks are
stored.

The rules are those of the portable write in ``billing/ingest.py`` (used on SQLite), and
``tests/billing/test_ingest.py`` holds the two to the same results:

- a commit settles the latest check of its request at or before it (the latest one if none
  is); in the batch when the check is there, even after the commit, else a stored one;
- of several commits reaching the same check, the earliest settles it, the others change
  nothing (logged when they differ);
- a request never committed is billed at its estimate, as input tokens at the input price.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import psycopg
from django.db import DataError, connection, transaction
from psycopg import sql

from billing.ingest import Entry, entry_normalised

logger = logging.getLogger(__name__)

# This batch's checks, each with its commit when that is in the batch too, and the commits
# left over (their check is stored, in another consumer's hands, or lost to an earlier
# commit).
CHECKS = "billing_drain_checks"
CHECK_COLUMNS = (
    "tenant_id bigint, event_id text, at_us bigint, request_id text, api_key_id bigint, "
    "user_id text, model_id text, policy_version bigint, estimated_tokens bigint, "
    "commit_id text, commit_at_us bigint, input_tokens bigint, output_tokens bigint, "
    "status text"
)
COMMITS = "billing_drain_commits"
COMMIT_COLUMNS = (
    "tenant_id bigint, commit_id text, at_us bigint, request_id text, input_tokens bigint, "
    "output_tokens bigint, status text"
)
# LedgerState row whose position is the greatest usage event id the top-user rollups include.
USERS_FOLDED = "users"
_UNSETTLED = b"\t\t\t\t\t\n"  # a check without its commit: the five commit columns empty


class NotAsWritten(Exception):  # noqa: N818 - it is a condition, not a failure
    """A staged value the database refused (out of range, too long, not text)."""


@dataclass(frozen=True)
class Staged:
    """A batch laid out for ``COPY``."""

    checks_text: bytes
    commits_text: bytes
    entries: int  # stream entries it holds
    checks: int
    models: frozenset[str]  # of the checks


# -- laying a batch out ------------------------------------------------------------------
# A check's and a commit's document exactly as the engine lays it out (compact JSON, its
# keys in its order), read by one pattern into a tuple: names without escapes or control
# characters, whole numbers as JSON writes them. Any other document is parsed as JSON.
_NAME = rb'"([^"\\\x00-\x1f]*)"'
_ANY_NAME = rb'(?:null|"[^"\\\x00-\x1f]*")'
_WHOLE = rb"0|[1-9][0-9]*"
_CHECK_DOCUMENT = re.compile(
    rb'\{"request_id":'
    + _NAME
    + rb',"tenant":-?(?:'
    + _WHOLE
    + rb'),"key":(null|'
    + _WHOLE
    + rb'),"user":'
    + _NAME
    + rb',"model":'
    + _NAME
    + rb',"tokens":(-?(?:'
    + _WHOLE
    + rb')),"version":('
    + _WHOLE
    + rb")\}"
).fullmatch
_COMMIT_DOCUMENT = re.compile(
    rb'\{"request_id":'
    + _NAME
    + rb',"tenant":-?(?:'
    + _WHOLE
    + rb'),"key":(?:null|'
    + _WHOLE
    + rb'),"user":'
    + _ANY_NAME
    + rb',"model":'
    + _ANY_NAME
    + rb',"input_tokens":(-?(?:'
    + _WHOLE
    + rb')),"output_tokens":(-?(?:'
    + _WHOLE
    + rb')),"status":"([^"\\\x00-\x1f]{1,16})"\}'
).fullmatch
_MINUS = ord("-")

# json.loads without its wrapping (finding the encoding, skipping white space, checking for
# more after the document), which costs more than the parse of an entry's small document:
# the C scanner on text, the end checked here. Anything unusual goes to json.loads.
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class _Layout:
    """A batch's rows for ``COPY``, made as the entries come: one line per check (its commit
    part filled in when its commit is in the batch too) and one per commit left over.
    Bytes, not an object per entry: a batch may hold tens of thousands."""

    def __init__(self, *, escaped: bool) -> None:
        self.clean: Any = _escape if escaped else str
        self.heads: list[bytes] = []
        self.tails: list[bytes] = []
        # (tenant, request id) -> the index of its check, or a list of indexes when the
        # request id came back (reused after its first record expired)
        self.by_request: dict[tuple[int, bytes], Any] = {}
        # (tenant, entry id, time, request id, input tokens, output tokens, status)
        self.commits: list[tuple[Any, ...]] = []
        self.models: set[bytes] = set()

    def check(
        self,
        tenant_id: int,
        entry_id: str,
        at_us: int,
        request_id: str,
        key: int | None,
        user: str,
        model: str,
        version: int,
        tokens: int,
    ) -> None:
        """A check parsed from JSON (or normalised)."""
        clean = self.clean
        self.pair(tenant_id, request_id.encode(), len(self.heads))
        self.heads.append(
            (
                f"{tenant_id}\t{clean(entry_id)}\t{at_us}\t{clean(request_id)}\t"
                f"{'' if key is None else key}\t{clean(user)}\t{clean(model)}\t{version}\t"
                f"{tokens if tokens > 0 else 0}"
            ).encode()
        )
        self.tails.append(_UNSETTLED)
        self.models.add(model.encode())

    def pair(self, tenant_id: int, request_id: bytes, index: int) -> None:
        found = self.by_request.setdefault((tenant_id, request_id), index)
        if found != index:
            if type(found) is int:
                self.by_request[(tenant_id, request_id)] = [found, index]
            else:
                found.append(index)

    def commit(
        self,
        tenant_id: int,
        entry_id: str,
        at_us: int,
        request_id: str,
        input_tokens: int,
        output_tokens: int,
        status: str,
    ) -> None:
        """A commit parsed from JSON (or normalised)."""
        clean = self.clean
        self.commits.append(
            (
                tenant_id,
                clean(entry_id).encode(),
                b"%d" % at_us,
                request_id.encode(),
                b"%d" % max(0, input_tokens),
                b"%d" % max(0, output_tokens),
                clean(status).encode(),
                clean(request_id).encode(),
            )
        )

    def entry(self, entry: Entry) -> None:
        """A parsed, normalised entry."""
        data = entry.data
        if entry.kind == "check":
            self.check(
                entry.tenant_id,
                entry.entry_id,
                entry.at_us,
                data["request_id"],
                data["key"],
                data["user"],
                data["model"],
                data["version"],
                data["tokens"],
            )
        else:
            self.commit(
                entry.tenant_id,
                entry.entry_id,
                entry.at_us,
                data["request_id"],
                data["input_tokens"],
                data["output_tokens"],
                data["status"],
            )

    def staged(self, *, quick: bool) -> Staged | None:
        """Settle the checks with the batch's commits (each commit the latest check of its
        request at or before it, else the latest; the earliest commit reaching a check wins)
        and lay the rows out. ``quick``: None when a value would need escaping."""
        leftover: list[tuple[Any, ...]] = []
        settled: dict[int, tuple[Any, ...]] = {}
        for commit in self.commits:
            found = self.by_request.get((commit[0], commit[3]))
            if found is None:
                leftover.append(commit)
                continue
            index = found if type(found) is int else self._latest(found, int(commit[2]))
            earlier = settled.get(index)
            if earlier is None:
                settled[index] = commit
            elif int(commit[2]) < int(earlier[2]):
                settled[index] = commit
                leftover.append(earlier)
            else:
                leftover.append(commit)
        tails = self.tails
        for index, commit in settled.items():
            tails[index] = b"\t%b\t%b\t%b\t%b\t%b\n" % (commit[1], commit[2], *commit[4:7])
        checks_text = b"".join(chain.from_iterable(zip(self.heads, tails, strict=True)))
        commits_text = b"".join(
            b"%d\t%b\t%b\t%b\t%b\t%b\t%b\n" % (*commit[:3], commit[7], *commit[4:7])
            for commit in leftover
        )
        if quick:
            # Names are the callers' text: a tab or line break in one would shift the
            # columns, so such a batch is laid out again with every value escaped. A
            # backslash only needs doubling, and nothing else in a row has one.
            for text, lines, columns in (
                (checks_text, len(self.heads), 14),
                (commits_text, len(leftover), 7),
            ):
                if text.count(b"\t") != (columns - 1) * lines or text.count(b"\n") != lines:
                    return None
                if b"\r" in text:
                    return None
            checks_text = checks_text.replace(b"\\", b"\\\\")
            commits_text = commits_text.replace(b"\\", b"\\\\")
        try:
            models = frozenset(model.decode() for model in self.models)
        except UnicodeDecodeError:  # raw bytes that are not UTF-8: not text at all
            return None
        entries = len(self.heads) + len(self.commits)
        return Staged(checks_text, commits_text, entries, len(self.heads), models)

    def _latest(self, indexes: list[int], at_us: int) -> int:
        # Rare (a request id used again): its checks' times and ids read back from their
        # lines.
        fields = {index: self.heads[index].split(b"\t", 3) for index in indexes}
        times = {index: int(fields[index][2]) for index in indexes}
        ordered = sorted(indexes, key=lambda index: (times[index], fields[index][1]))
        found = None
        for index in ordered:
            if times[index] <= at_us:
                found = index
        # Clocks agree within a script call; a commit stamped before its check can only
        # come from a moved test clock. The request id still names the check.
        return found if found is not None else ordered[-1]


def _escape(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def staged_from_stream(streams: Iterable[tuple[int, list[Any]]]) -> Staged | None:
    """Entries as Redis returned them, laid out for ``COPY``; None when a value would need
    escaping (then ``staged_from_entries`` does it carefully).

    Entries written as the engine writes them take the quick way; any other goes through
    ``entry_normalised``, which logs and leaves out what is malformed."""
    from billing.ingest import StreamEntries

    check_document, commit_document, scan = _CHECK_DOCUMENT, _COMMIT_DOCUMENT, _scan_json
    layout = _Layout(escaped=False)
    # Bound once: the loop below runs per entry.
    heads, by_request = layout.heads, layout.by_request
    add_head, add_tail, add_model = heads.append, layout.tails.append, layout.models.add
    add_commit, pair, first_of = layout.commits.append, layout.pair, by_request.setdefault
    join, unsettled = b"\t".join, _UNSETTLED
    odd = StreamEntries()
    try:
        for tenant_id, items in streams:
            tenant = b"%d" % tenant_id
            odd_items = []
            for raw_id, flat in items:
                try:
                    k, kind, e, document, t, at = flat
                except (TypeError, ValueError):  # not six fields
                    odd_items.append((raw_id, flat))
                    continue
                if not (
                    k == b"k"
                    and e == b"e"
                    and t == b"t"
                    # Digits only: a time the engine can have written, as COPY reads it.
                    and at.isdigit()
                    and len(at) < 18
                ):
                    odd_items.append((raw_id, flat))
                    continue
                if kind == b"check":
                    match = check_document(document)
                    if match is not None:
                        request_id, key, user, model, tokens, version = match.groups()
                        index = len(heads)
                        if first_of((tenant_id, request_id), index) != index:
                            pair(tenant_id, request_id, index)  # a request id used again
                        add_head(
                            join(
                                (
                                    tenant,
                                    raw_id,
                                    at,
                                    request_id,
                                    b"" if key == b"null" else key,
                                    user,
                                    model,
                                    version,
                                    b"0" if tokens[0] == _MINUS else tokens,
                                )
                            )
                        )
                        add_tail(unsettled)
                        add_model(model)
                        continue
                elif kind == b"commit":
                    match = commit_document(document)
                    if match is not None:
                        request_id, used_in, used_out, status = match.groups()
                        add_commit(
                            (
                                tenant_id,
                                raw_id,
                                at,
                                request_id,
                                b"0" if used_in[0] == _MINUS else used_in,
                                b"0" if used_out[0] == _MINUS else used_out,
                                status,
                                request_id,
                            )
                        )
                        continue
                if not _parsed_entry(layout, scan, tenant_id, raw_id, kind, document, at):
                    odd_items.append((raw_id, flat))
            if odd_items:
                odd.add(tenant_id, odd_items)
        if odd.count:
            for entry in odd.parsed():
                layout.entry(entry)
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape
        return None
    return layout.staged(quick=True)


def _parsed_entry(
    layout: _Layout,
    scan: Any,
    tenant_id: int,
    raw_id: bytes,
    kind: bytes,
    document: bytes,
    at: bytes,
) -> bool:
    """A document not laid out as the engine lays it out, parsed as JSON; False when it is
    not written with the types the engine writes either."""
    try:
        text = document.decode()
        data, end = scan(text, 0)
    except (ValueError, StopIteration):
        return False
    if end != len(text) or type(data) is not dict:
        return False
    get = data.get
    request_id = get("request_id")
    if type(request_id) is not str:
        return False
    if kind == b"check":
        key, user, model = get("key"), get("user"), get("model")
        version, tokens = get("version"), get("tokens")
        if (
            type(user) is str
            and type(model) is str
            and type(tokens) is int
            and type(version) is int
            and (key is None or type(key) is int)
        ):
            layout.check(
                tenant_id, raw_id.decode(), int(at), request_id, key, user, model, version, tokens
            )
            return True
    elif kind == b"commit":
        used_in, used_out, status = get("input_tokens"), get("output_tokens"), get("status")
        if (
            type(used_in) is int
            and type(used_out) is int
            and type(status) is str
            and 0 < len(status) <= 16
        ):
            layout.commit(
                tenant_id, raw_id.decode(), int(at), request_id, used_in, used_out, status
            )
            return True
    return False


def staged_from_entries(entries: Iterable[Entry]) -> Staged:
    """Parsed entries laid out for ``COPY``, every value checked and escaped; malformed ones
    are logged and left out."""
    unique: dict[tuple[int, str], Entry] = {}
    for entry in entries:
        try:
            unique[(entry.tenant_id, entry.entry_id)] = entry_normalised(entry)
        except (KeyError, TypeError, ValueError, OverflowError, UnicodeError) as error:
            logger.error(
                "billing: skipping malformed usage entry %s of tenant %s: %s",
                entry.entry_id,
                entry.tenant_id,
                error,
            )
    layout = _Layout(escaped=True)
    for entry in unique.values():
        layout.entry(entry)
    staged = layout.staged(quick=False)
    assert staged is not None  # noqa: S101 - only the quick layout gives up
    return staged


# -- writing it --------------------------------------------------------------------------
HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
# A microsecond count as a timestamp, and back, exactly.
_AT = "(timestamptz 'epoch' + {0} * interval '1 microsecond')"
_US = "(extract(epoch from {0}) * 1000000)::bigint"


def _rollup(
    table: str, bucket: str, expression: str, source: str, subject: str, *, summed: bool = False
) -> str:
    """Add sums of ``source`` (``model_hours`` or ``user_days``) to a coarser rollup.
    ``summed``: ``source`` holds each of the rollup's buckets once already."""
    counters = ["requests", "input_tokens", "output_tokens", "cost"]
    sums = ["sum(requests)", "sum(input_tokens)", "sum(output_tokens)", "sum(cost)"]
    if subject == "model_id":
        counters.append("estimated_requests")
        sums.append("sum(estimated)")
    updates = ", ".join(f"{name} = rollup.{name} + excluded.{name}" for name in counters)
    values = ", ".join(counters if summed else sums)
    return f"""
    INSERT INTO {table} AS rollup ({bucket}, tenant_id, {subject}, {", ".join(counters)})
    SELECT {expression}, tenant_id, {subject}, {values}
    FROM {source} {"" if summed else "GROUP BY 1, 2, 3"}
    ON CONFLICT ({bucket}, tenant_id, {subject}) DO UPDATE SET {updates}"""  # noqa: S608


# The first day of an hour's or a day's month (the session's time zone is UTC).
_MONTH = "date_trunc('month', {0})::date"


WRITE = f"""
WITH
checks AS NOT MATERIALIZED (
    SELECT tenant_id, event_id, coalesce(request_id, '') AS request_id, api_key_id,
           coalesce(user_id, '') AS user_id, coalesce(model_id, '') AS model_id,
           policy_version, at_us, estimated_tokens, commit_id, commit_at_us, input_tokens,
           output_tokens, status
    FROM {CHECKS}
),
pending AS (
    SELECT id AS pending_id, tenant_id, event_id AS commit_id, payload,
           {_US.format("occurred_at")} AS at_us
    FROM billing_pendingcommit ORDER BY occurred_at, id LIMIT %(pending)s
),
-- Commits that settle no check of this batch, and (second run) those that waited.
commits AS (
    SELECT tenant_id, commit_id, coalesce(request_id, '') AS request_id, at_us,
           input_tokens, output_tokens, status, NULL::bigint AS pending_id
    FROM {COMMITS}
    UNION ALL
    SELECT tenant_id, commit_id, payload ->> 'request_id', at_us,
           greatest(trunc((payload ->> 'input_tokens')::numeric)::bigint, 0),
           greatest(trunc((payload ->> 'output_tokens')::numeric)::bigint, 0),
           left(coalesce(nullif(payload ->> 'status', ''), 'ok'), 16), pending_id
    FROM pending
),
prices AS (
    SELECT id, model_id, input_price_per_1k, output_price_per_1k,
           -- usage before a model's first price is priced at that first price
           CASE WHEN row_number() OVER model_prices > 1
                THEN {_US.format("valid_from")} END AS from_us,
           {_US.format("lead(valid_from) OVER model_prices")} AS until_us
    FROM billing_modelprice
    WINDOW model_prices AS (PARTITION BY model_id ORDER BY valid_from)
),
-- Each tenant's greatest stored entry id (in the column's own order): a check whose id
-- sorts after it cannot be stored, and a stream's new entries do. One look into the unique
-- index per tenant instead of one per check.
tops AS MATERIALIZED (
    SELECT tenants.tenant_id,
           coalesce((SELECT max(stored.event_id) FROM billing_usageevent AS stored
                     WHERE stored.tenant_id = tenants.tenant_id), '') AS top
    FROM (SELECT DISTINCT tenant_id FROM {CHECKS}) AS tenants
),
-- The checks not stored yet, as they are stored. Every writer holds the ledger lock, so
-- nothing can store one between this look and the insert; a plain insert costs about a
-- third less than ON CONFLICT DO NOTHING, and the batch holds each entry once.
new AS MATERIALIZED (
    SELECT at_us, tenant_id, event_id, request_id, api_key_id, user_id, model_id, policy_version,
           {_AT.format("at_us")} AS occurred_at, estimated_tokens, input_tokens, output_tokens,
           coalesce(status, '') AS status, {_AT.format("commit_at_us")} AS committed_at,
           coalesce(commit_id, '') AS commit_event_id, billed_input AS billed_input_tokens,
           billed_output AS billed_output_tokens, commit_id IS NULL AS is_estimate, price_id,
           (billed_input * input_price + billed_output * output_price) * 0.001 AS cost
    FROM (
        SELECT checks.*, tops.top, coalesce(prices.id, 0) AS price_id,
               coalesce(prices.input_price_per_1k, 0) AS input_price,
               coalesce(prices.output_price_per_1k, 0) AS output_price,
               coalesce(checks.input_tokens, checks.estimated_tokens) AS billed_input,
               coalesce(checks.output_tokens, 0) AS billed_output
        FROM checks
        JOIN tops USING (tenant_id)
        LEFT JOIN prices ON prices.model_id = checks.model_id
                        AND (prices.from_us IS NULL OR prices.from_us <= checks.at_us)
                        AND (prices.until_us IS NULL OR checks.at_us < prices.until_us)
        OFFSET 0  -- priced as a whole (a hash of the prices), then looked up one by one
    ) AS priced
    -- Any other check is looked up in the unique index, one by one whatever the planner
    -- thinks of the table's size (an anti-join may sort or hash all of it).
    WHERE CASE WHEN priced.event_id > priced.top THEN true
               ELSE (SELECT true FROM billing_usageevent AS stored
                     WHERE stored.tenant_id = priced.tenant_id
                       AND stored.event_id = priced.event_id) IS NULL
          END
),
inserted AS (
    INSERT INTO billing_usageevent (
        tenant_id, event_id, request_id, api_key_id, user_id, model_id, policy_version,
        occurred_at, estimated_tokens, input_tokens, output_tokens, status, committed_at,
        commit_event_id, billed_input_tokens, billed_output_tokens, is_estimate, price_id, cost)
    SELECT tenant_id, event_id, request_id, api_key_id, user_id, model_id, policy_version,
           occurred_at, estimated_tokens, input_tokens, output_tokens, status, committed_at,
           commit_event_id, billed_input_tokens, billed_output_tokens, is_estimate, price_id,
           cost
    FROM new
),
-- A check stored before (a batch written again): its commit amends it like any other.
unmatched AS (
    SELECT * FROM commits
    UNION ALL
    SELECT tenant_id, commit_id, request_id, commit_at_us, input_tokens, output_tokens,
           status, NULL
    FROM checks
    WHERE commit_id IS NOT NULL
      AND (SELECT count(*) FROM new) < %(checks)s
      -- (looked up one by one, as in new)
      AND (SELECT true FROM billing_usageevent AS stored
           WHERE stored.tenant_id = checks.tenant_id
             AND stored.event_id = checks.event_id) IS NOT NULL
),
-- The checks of their requests as stored before this statement, and this batch's new rows
-- (row_id NULL, ranked as the newest). A commit left over by the batch only ever finds a
-- new row settled already, by an earlier commit. Stored checks are looked up in the request
-- index, commit by commit: a table the planner has no statistics for yet looks small, and
-- a merge join sorted all of it for every batch with a commit left over (200 ms a batch at
-- 50,000 events).
candidates AS (
    SELECT unmatched.tenant_id, unmatched.commit_id, unmatched.at_us AS commit_us,
           event.id AS row_id, {_US.format("event.occurred_at")} AS event_us,
           event.commit_event_id, event.billed_input_tokens AS old_input,
           event.billed_output_tokens AS old_output, event.is_estimate AS old_estimate,
           event.cost AS old_cost, event.price_id
    FROM unmatched
    CROSS JOIN LATERAL (SELECT * FROM billing_usageevent AS stored
                        WHERE stored.tenant_id = unmatched.tenant_id
                          AND stored.request_id = unmatched.request_id
                        OFFSET 0) AS event
    UNION ALL
    SELECT unmatched.tenant_id, unmatched.commit_id, unmatched.at_us, NULL,
           new.at_us, new.commit_event_id, NULL, NULL, NULL, NULL,
           NULL
    FROM unmatched
    JOIN new ON new.tenant_id = unmatched.tenant_id AND new.request_id = unmatched.request_id
),
target AS (
    SELECT DISTINCT ON (tenant_id, commit_id) *
    FROM candidates
    ORDER BY tenant_id, commit_id, event_us <= commit_us DESC, event_us DESC, row_id DESC
),
winners AS (
    SELECT DISTINCT ON (target.row_id) target.*, unmatched.input_tokens,
           unmatched.output_tokens, unmatched.status,
           coalesce(price.input_price_per_1k, 0) AS input_price,
           coalesce(price.output_price_per_1k, 0) AS output_price
    FROM target
    JOIN unmatched USING (tenant_id, commit_id)
    LEFT JOIN billing_modelprice AS price ON price.id = target.price_id
    WHERE target.commit_event_id = '' AND target.row_id IS NOT NULL
    ORDER BY target.row_id, target.commit_us, target.commit_id
),
amended AS (
    UPDATE billing_usageevent AS event
    SET input_tokens = winners.input_tokens, output_tokens = winners.output_tokens,
        status = winners.status, committed_at = {_AT.format("winners.commit_us")},
        commit_event_id = winners.commit_id, billed_input_tokens = winners.input_tokens,
        billed_output_tokens = winners.output_tokens, is_estimate = false,
        cost = (winners.input_tokens * winners.input_price
                + winners.output_tokens * winners.output_price) * 0.001
    FROM winners
    WHERE event.id = winners.row_id
    RETURNING event.id, event.tenant_id, event.event_id, event.request_id, event.user_id,
              event.model_id, event.price_id, event.occurred_at, event.estimated_tokens,
              event.billed_input_tokens, event.billed_output_tokens, event.cost,
              winners.old_input, winners.old_output, winners.old_estimate, winners.old_cost,
              winners.input_price
),
-- A commit reaching a check that was settled already changes nothing.
ignored AS (
    SELECT target.tenant_id, target.commit_id,
           coalesce(nullif(target.commit_event_id, ''), winner.commit_id) AS settled_by
    FROM target
    LEFT JOIN winners AS winner ON winner.row_id = target.row_id
    WHERE target.commit_event_id <> '' OR winner.commit_id <> target.commit_id
),
applied_pending AS (
    DELETE FROM billing_pendingcommit
    WHERE id IN (SELECT pending_id FROM commits
                 WHERE pending_id IS NOT NULL
                   AND EXISTS (SELECT 1 FROM target
                               WHERE target.tenant_id = commits.tenant_id
                                 AND target.commit_id = commits.commit_id
                                 AND (target.row_id IS NOT NULL
                                      OR target.commit_event_id <> '')))
    RETURNING 1
),
waiting AS (
    INSERT INTO billing_pendingcommit (tenant_id, event_id, request_id, occurred_at, payload,
                                       created_at)
    SELECT tenant_id, commit_id, request_id, {_AT.format("at_us")},
           jsonb_build_object('request_id', request_id, 'input_tokens', input_tokens,
                              'output_tokens', output_tokens, 'status', status),
           now()
    FROM unmatched
    WHERE pending_id IS NULL
      AND NOT EXISTS (SELECT 1 FROM target
                      WHERE target.tenant_id = unmatched.tenant_id
                        AND target.commit_id = unmatched.commit_id
                        -- (a new row still open would be amended by the next batch)
                        AND (target.row_id IS NOT NULL OR target.commit_event_id <> ''))
    ON CONFLICT (tenant_id, event_id) DO NOTHING
    RETURNING 1
),
-- What the rollups gain, per row; hours and days as numbers (cheaper to group by than
-- times) until summed.
deltas AS NOT MATERIALIZED (
    SELECT at_us / {HOUR_US} AS hour, at_us / {DAY_US} AS day, tenant_id, model_id,
           price_id, user_id, 1 AS requests, billed_input_tokens AS input_tokens,
           billed_output_tokens AS output_tokens, is_estimate::int AS estimated, cost
    FROM new
    UNION ALL
    SELECT at_us / {HOUR_US}, at_us / {DAY_US}, tenant_id, model_id, price_id, user_id, 0,
           billed_input_tokens - old_input, billed_output_tokens - old_output,
           -old_estimate::int, cost - old_cost
    FROM (SELECT *, {_US.format("occurred_at")} AS at_us FROM amended) AS changed
),
-- Summed once per hour and model, and per day and user; the coarser rollups from those.
model_hours AS MATERIALIZED (
    SELECT {_AT.format(f"hour * {HOUR_US}")} AS hour, tenant_id, model_id, price_id,
           requests, input_tokens, output_tokens, estimated, cost
    FROM (SELECT hour, tenant_id, model_id, price_id, sum(requests) AS requests,
                 sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                 sum(estimated) AS estimated, sum(cost) AS cost
          FROM deltas GROUP BY 1, 2, 3, 4) AS summed
),
hourly AS (
    INSERT INTO billing_hourlyrollup AS rollup (hour, tenant_id, model_id, price_id,
        requests, input_tokens, output_tokens, estimated_requests, cost)
    SELECT * FROM model_hours
    ON CONFLICT (hour, tenant_id, model_id, price_id) DO UPDATE SET
        requests = rollup.requests + excluded.requests,
        input_tokens = rollup.input_tokens + excluded.input_tokens,
        output_tokens = rollup.output_tokens + excluded.output_tokens,
        estimated_requests = rollup.estimated_requests + excluded.estimated_requests,
        cost = rollup.cost + excluded.cost
),
daily AS ({_rollup("billing_dailyrollup", "day", "hour::date", "model_hours", "model_id")}),
monthly AS (
    {_rollup("billing_monthlyrollup", "month", _MONTH.format("hour"), "model_hours", "model_id")}
),
-- The top-user rollups take this batch's new events from the table when they are folded in
-- (``FOLD_USERS``); an amendment of an event folded in already waits as a delta.
user_deltas AS (
    INSERT INTO billing_userusagedelta (day, tenant_id, user_id, requests, input_tokens,
                                        output_tokens, cost)
    SELECT occurred_at::date, tenant_id, user_id, 0, sum(billed_input_tokens - old_input),
           sum(billed_output_tokens - old_output), sum(cost - old_cost)
    FROM amended
    WHERE id <= (SELECT coalesce(max(position), 0) FROM billing_ledgerstate
                 WHERE name = '{USERS_FOLDED}')
    GROUP BY 1, 2, 3
),
-- Usage of a month whose statement was sent lands on the next statement still open: a late
-- event whole, a late commit as what it changed against the estimate billed.
touched AS MATERIALIZED (
    SELECT 'event' AS kind, tenant_id, event_id, request_id, model_id,
           date_trunc('month', occurred_at)::date AS month,
           billed_input_tokens AS input_tokens, billed_output_tokens AS output_tokens, cost
    FROM new
    UNION ALL
    SELECT 'commit', tenant_id, event_id, request_id, model_id,
           date_trunc('month', occurred_at)::date,
           billed_input_tokens - estimated_tokens, billed_output_tokens,
           cost - estimated_tokens * input_price * 0.001
    FROM amended
),
finalised AS MATERIALIZED (
    SELECT months.tenant_id, months.month,
           (SELECT min(later)::date
            FROM generate_series(months.month + interval '1 month',
                                 months.month + interval '1200 months',
                                 interval '1 month') AS later
            WHERE NOT EXISTS (SELECT 1 FROM billing_statement AS open
                              WHERE open.tenant_id = months.tenant_id
                                AND open.month = later::date)) AS landing
    FROM (SELECT DISTINCT tenant_id, month FROM touched) AS months
    WHERE EXISTS (SELECT 1 FROM billing_statement AS sent
                  WHERE sent.tenant_id = months.tenant_id AND sent.month = months.month)
),
adjusted AS (
    INSERT INTO billing_statementadjustment (tenant_id, event_id, kind, request_id, model_id,
        usage_month, statement_month, input_tokens, output_tokens, cost, created_at)
    SELECT touched.tenant_id, touched.event_id, touched.kind, touched.request_id,
           touched.model_id, touched.month, finalised.landing, touched.input_tokens,
           touched.output_tokens, touched.cost, now()
    FROM finalised JOIN touched USING (tenant_id, month)
    ON CONFLICT (tenant_id, event_id, kind) DO NOTHING
    RETURNING 1
),
hours AS (SELECT DISTINCT tenant_id, hour FROM model_hours)
SELECT
    (SELECT count(*) FROM new),
    (SELECT count(*) FROM amended),
    (SELECT count(*) FROM pending),
    (SELECT count(*) FROM applied_pending),
    (SELECT count(*) FROM waiting),
    (SELECT count(*) FROM adjusted),
    (SELECT coalesce(array_agg(tenant_id), '{{}}') FROM hours),
    (SELECT coalesce(array_agg(hour), '{{}}') FROM hours),
    (SELECT coalesce(array_agg(ARRAY[ignored.tenant_id::text, commits.request_id,
                                     ignored.settled_by, ignored.commit_id]), '{{}}')
     FROM ignored JOIN unmatched AS commits USING (tenant_id, commit_id)
     WHERE ignored.settled_by <> ignored.commit_id),
    EXISTS (SELECT 1 FROM billing_pendingcommit)
"""  # noqa: S608


# Where the last fold stopped, the first event after it and the newest; the fold's hours
# and days are UTC's.
_FOLD_FROM = f"""
SELECT folded.position,
       (SELECT min(id) FROM billing_usageevent WHERE id > folded.position),
       (SELECT max(id) FROM billing_usageevent)
FROM (SELECT coalesce(max(position), 0) AS position FROM billing_ledgerstate
      WHERE name = '{USERS_FOLDED}') AS folded;
SET LOCAL timezone = 'UTC'
"""  # noqa: S608

# The usage events written since the last fold (ids after ``after``, through ``through``) and
# the deltas waiting, summed per bucket and added to the top-user rollups; the deltas deleted
# and the mark moved, in one statement (under the ledger lock, so that no batch writes
# meanwhile; the session's time zone is UTC).
FOLD_USERS = f"""
WITH
fresh AS (
    -- (summed per day as a time, which date_bin finds by arithmetic alone, then made a date:
    -- ::date on each event converts it to the time zone first; the origin is a UTC midnight
    -- before any event)
    SELECT day::date AS day, tenant_id, user_id, requests, input_tokens, output_tokens, cost
    FROM (SELECT date_bin('1 day', occurred_at, timestamptz '0001-01-01 00:00:00+00') AS day,
                 tenant_id, user_id, count(*) AS requests,
                 sum(billed_input_tokens) AS input_tokens,
                 sum(billed_output_tokens) AS output_tokens, sum(cost) AS cost
          FROM billing_usageevent
          WHERE id > %(after)s AND id <= %(through)s
          GROUP BY 1, 2, 3) AS summed
),
moved AS (
    DELETE FROM billing_userusagedelta
    RETURNING day, tenant_id, user_id, requests, input_tokens, output_tokens, cost
),
user_days AS MATERIALIZED (
    SELECT day, tenant_id, user_id, sum(requests) AS requests,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost) AS cost
    FROM (SELECT * FROM fresh UNION ALL SELECT * FROM moved) AS changes
    GROUP BY 1, 2, 3
),
daily_users AS (
    {_rollup("billing_dailyuserrollup", "day", "day", "user_days", "user_id", summed=True)}
),
monthly_users AS (
    {_rollup("billing_monthlyuserrollup", "month", _MONTH.format("day"), "user_days", "user_id")}
),
marked AS (
    INSERT INTO billing_ledgerstate (name, position) VALUES ('{USERS_FOLDED}', %(through)s)
    ON CONFLICT (name) DO UPDATE SET position = excluded.position
)
SELECT (SELECT coalesce(sum(requests), 0) FROM fresh) + (SELECT count(*) FROM moved)
"""  # noqa: S608


@dataclass
class Written:
    inserted: int = 0
    amended: int = 0  # checks stored before settled by a commit (or by one that waited)
    pending: int = 0  # commits waiting for their check after the write
    adjustments: int = 0
    hours: set[tuple[int, dt.datetime]] = field(default_factory=set)


# Connections on which this process created the staging table (it lives as long as they).
_staged_on: weakref.WeakSet[Any] = weakref.WeakSet()


def begin(staged: Staged) -> None:
    """Start writing a batch in this transaction, in one round trip: take the ledger lock,
    set the session up, empty the staging tables, and give models that were never priced
    their current price (as the portable write does); then COPY the batch in."""
    from billing.services import model_price_seed

    raw = connection.connection
    with connection.cursor() as cursor:
        if raw not in _staged_on:
            for table, columns in ((CHECKS, CHECK_COLUMNS), (COMMITS, COMMIT_COLUMNS)):
                cursor.execute(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({columns}) "
                    "ON COMMIT DELETE ROWS"
                )
            # Remembered once it is sure to exist: a rolled-back transaction takes it along.
            transaction.on_commit(lambda: _staged_on.add(raw))
        cursor.execute(
            sql.SQL(
                "SELECT DISTINCT model_id FROM billing_modelprice WHERE model_id = ANY({});"
                # The ledger lock, as ledger_lock() takes it.
                "INSERT INTO billing_ledgerstate (name) VALUES ('drain') "
                "ON CONFLICT (name) DO NOTHING;"
                "SELECT name FROM billing_ledgerstate WHERE name = 'drain' FOR UPDATE;"
                # Hours, days and months are UTC's; the statement's hash tables and sorts
                # for a batch fit in memory with room to spare.
                "SET LOCAL timezone = 'UTC'; SET LOCAL work_mem = '64MB';"
                # Empty at every commit, but a rolled-back savepoint may have left rows.
                # (DELETE: on an empty table it does nothing, where TRUNCATE makes new files.)
                "DELETE FROM {}; DELETE FROM {}"
            )
            .format(
                sql.Literal(sorted(staged.models)), sql.Identifier(CHECKS), sql.Identifier(COMMITS)
            )
            .as_string(raw)
        )
        priced = {row[0] for row in cursor.fetchall()}
        try:
            for table, text in ((CHECKS, staged.checks_text), (COMMITS, staged.commits_text)):
                if text:
                    with cursor.cursor.copy(f"COPY {table} FROM STDIN (NULL '')") as copy:
                        copy.write(text)
        except psycopg.DataError as error:
            raise NotAsWritten(str(error)) from error
    for model_id in staged.models - priced:
        # A model priced before billing kept a history: its current price has applied
        # since the beginning.
        model_price_seed(model_id=model_id)


# Compiling a statement this size to machine code (once its estimated cost passes
# ``jit_above_cost``, as a batch of some 16,000 checks does) takes longer than running it.
_UNJITTED = (("jit", "off"),)
# The batch statement's joins of what it staged (which has no statistics) with each other
# hash the smaller side: a merge join sorted a batch's 10,000 new rows to find the few a
# commit left over reaches (11 ms a batch).
_WRITE_SETTINGS = (*_UNJITTED, ("enable_mergejoin", "off"))


def _run_alone(cursor: Any, statement: str, settings: tuple[tuple[str, str], ...]) -> Any:
    """``statement``'s first row, with ``settings`` changed for it alone: set before it and
    put back to the session's values after it, in the same round trip, so that later
    statements of the same transaction (a test's, or a caller's) are planned as usual.
    ``statement`` carries its values (whole numbers only): several statements in one call
    take no parameters."""
    before = "; ".join(f"SET LOCAL {name} = {value}" for name, value in settings)
    after = "; ".join(f"SET LOCAL {name} TO DEFAULT" for name, _ in settings)
    cursor.execute(f"{before}; {statement}; {after}")
    for _ in settings:
        cursor.nextset()
    return cursor.fetchone()


def write_staged(staged: Staged, *, pending_limit: int) -> Written:
    """Write what ``begin`` staged. Raises ``NotAsWritten`` when the database refuses a
    value."""
    written = Written()
    with connection.cursor() as cursor:
        try:
            row = _run_alone(
                cursor, WRITE % {"pending": 0, "checks": int(staged.checks)}, _WRITE_SETTINGS
            )
            if _add(written, row):
                # Commits that waited for their check, tried once this batch's checks are
                # stored (with this batch's own, which find nothing more).
                cursor.execute(f"TRUNCATE {CHECKS}, {COMMITS}")
                row = _run_alone(
                    cursor,
                    WRITE % {"pending": int(pending_limit), "checks": 0},
                    _WRITE_SETTINGS,
                )
                _add(written, row)
        except DataError as error:
            raise NotAsWritten(str(error)) from error
    return written


def user_rollups_fold(*, most: int) -> tuple[int, bool]:
    """Fold the events written (of the next ``most`` ids) and the deltas waiting since the
    last fold into the top-user rollups; the caller holds the ledger lock in this
    transaction. Returns how many events and deltas it folded, and whether it caught up."""
    with connection.cursor() as cursor:
        cursor.execute(_FOLD_FROM)
        after, first, newest = cursor.fetchone()
        newest = max(after, newest or 0)
        # (ids start anywhere and may have gaps: the part is counted from the first one)
        through = newest if first is None else min(newest, first + most - 1)
        fold = FOLD_USERS % {"after": int(after), "through": int(through)}
        # Events the planner has no statistics for yet look few, and few rows are summed by
        # sorting them: a hundred thousand are summed far faster in a hash table. The fold
        # sorts nothing else.
        row = _run_alone(cursor, fold, (*_UNJITTED, ("enable_sort", "off")))
        return int(row[0]), through == newest


def _add(written: Written, row: tuple[Any, ...]) -> bool:
    inserted, amended, pending, applied, added, adjustments, tenants, hours, ignored, more = row
    written.inserted += inserted
    written.amended += amended
    # The second run sees every commit waiting, the first one's new ones too.
    written.pending = pending - applied + added
    written.adjustments += adjustments
    written.hours.update(zip(tenants, hours, strict=True))
    for tenant_id, request_id, settled_by, commit_id in ignored:
        logger.warning(
            "billing: request %s of tenant %s was already settled by %s; ignoring %s",
            request_id,
            tenant_id,
            settled_by,
            commit_id,
        )
    return bool(more)
