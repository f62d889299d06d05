"""The Supabase store: PostgREST through the official async client, one SQL function (sql/) per atomic step."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, TypeVar

import httpx
from postgrest.exceptions import APIError
from postgrest.types import ReturnMethod
from supabase import AsyncClient, AsyncClientOptions, AsyncSupabaseException, acreate_client

from ..errors import ConfigError, StoreError, StoreUnavailable
from . import rows
from .base import NewEvent, OpenedSession, SessionRecord, StoredEvent, SummaryState, clipped, translated, without_nul

T = TypeVar("T")

# Supabase's default "Max Rows": the most rows one read returns, whatever it asks for. Reads page by it.
DEFAULT_PAGE_SIZE = 1000
_EVENT_COLUMNS = ",".join(rows.EVENT_COLUMNS)
# Answers after which the same call may succeed: every 5xx (PostgREST or its database down, restarting,
# overloaded or timing out), a gateway's request timeout, and rate limiting.
_RETRYABLE_4XX = {408, 429}
# Codes of a project that lacks this service's tables or functions.
_MISSING = {"PGRST202", "PGRST205", "42P01", "42883"}


class _ServerError(Exception):
    """An answer that says "not now", raised from the HTTP client's response hook."""

    def __init__(self, status: int, code: str | None, message: str | None) -> None:
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message


async def _raise_for_server_error(response: httpx.Response) -> None:
    # A hook sees the status, which postgrest-py's APIError does not keep: it alone tells a 503 from a 400.
    if response.status_code < 500 and response.status_code not in _RETRYABLE_4XX:
        return
    await response.aread()
    code = message = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code, message = body.get("code"), body.get("message")
    raise _ServerError(response.status_code, code, message or response.reason_phrase)


def _describe(text: str | None) -> str:
    # PostgreSQL quotes the offending value after a colon ('invalid input syntax for type bigint: "x"'), and
    # these strings end up in logs: keep the words, not the value. PostgREST's `details` (which names the
    # conflicting key) is never read.
    text = re.sub(r':\s*".*"', ': "…"', text or "", flags=re.DOTALL)
    return clipped(text)


def _store_error(e: Exception) -> StoreError:
    if isinstance(e, _ServerError):
        code = f" {e.code}" if e.code else ""
        return StoreUnavailable(f"Supabase: HTTP {e.status}{code}: {_describe(e.message)}")
    if isinstance(e, httpx.TimeoutException):
        return StoreUnavailable(f"Supabase: {type(e).__name__}: no answer within the timeout")
    if isinstance(e, httpx.TransportError):
        return StoreUnavailable(f"Supabase: {type(e).__name__}: {_describe(str(e))}")
    if isinstance(e, APIError):
        hint = " (are the migrations in sql/ applied?)" if e.code in _MISSING else ""
        return StoreError(f"Supabase: {e.code or 'error'}: {_describe(e.message)}{hint}")
    # A value JSON cannot carry (UnicodeError, NaN), an answer of an unexpected shape, another HTTP error.
    return StoreError(f"Supabase: {type(e).__name__}: {_describe(str(e))}")


def _mapped_errors() -> AbstractContextManager[None]:
    return translated((_ServerError, httpx.HTTPError, APIError, ValueError, TypeError, KeyError), _store_error)


class SupabaseStore:
    """The `Store` on a Supabase project, through its REST API (PostgREST) with the service role key.

    Reads of events are plain PostgREST queries; every write and every read that needs a join is one call to a
    function of sql/ (the ones PostgresStore calls too), so it is atomic. postgrest-py's own retries are off:
    callers retry on StoreUnavailable, and every write is safe to repeat (events by their keys, the rest by value).
    """

    name = "supabase"

    def __init__(self, client: AsyncClient, http: httpx.AsyncClient, *, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self._client = client
        self._http = http
        self._page_size = page_size

    @classmethod
    async def connect(
        cls,
        url: str,
        service_role_key: str,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> SupabaseStore:
        """Make the client, then check that the project answers, takes the key and has the migrations.

        `page_size` must not exceed the project's Max Rows (Settings → API; 1000 by default). Raises
        StoreUnavailable when the project cannot be reached, StoreError when it refuses the key or lacks
        the schema, ConfigError when the URL or key is malformed.
        """
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            http2=True,
            event_hooks={"response": [_raise_for_server_error]},
        )
        options = AsyncClientOptions(
            httpx_client=http, postgrest_client_retry=False, auto_refresh_token=False, persist_session=False
        )
        try:
            try:
                client = await acreate_client(url, service_role_key, options=options)
            except AsyncSupabaseException as e:
                raise ConfigError(f"SUPABASE_URL or SUPABASE_SERVICE_ROLE_KEY: {e.message}") from e
            store = cls(client, http, page_size=page_size)
            await store.ping()
            # Only the service role may call the functions: this fails for an anon key or missing migrations.
            await store.summary_state("")
        except BaseException:
            await http.aclose()
            raise
        return store

    async def _rpc(self, fn: str, params: dict[str, Any], parse: Callable[[Any], T]) -> T:
        with _mapped_errors():
            response = await self._client.rpc(fn, params).execute()
            return parse(response.data)

    async def open_session(self, session_id: str, *, owner_id: str | None, now: datetime) -> OpenedSession:
        params = {"p_session_id": session_id, "p_owner_id": owner_id, "p_now": rows.ts(now)}
        return await self._rpc(
            "chat_open_session",
            params,
            lambda row: OpenedSession(record=rows.record(SessionRecord, row), created=bool(row["created"])),
        )

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        if not events:
            return []
        batch = rows.event_batch(events)
        # One request for the whole batch: one transaction, ids in batch order, stored keys skipped.
        return await self._rpc("chat_append_events", {"p_events": batch}, lambda ids: rows.ids(ids, len(events)))

    async def events(
        self, session_id: str, *, after: int = 0, limit: int | None = None, types: Sequence[str] | None = None
    ) -> list[StoredEvent]:
        if (limit is not None and limit <= 0) or (types is not None and not types):
            return []
        # The last `limit` are read newest first, then turned around; either way page by id, so that no
        # page is cut short by the project's row cap.
        newest_first = limit is not None
        found: list[dict[str, Any]] = []
        before: int | None = None
        with _mapped_errors():
            while True:
                want = self._page_size if limit is None else min(self._page_size, limit - len(found))
                query = self._client.table("session_events").select(_EVENT_COLUMNS).eq("session_id", session_id)
                query = query.gt("id", after)
                if before is not None:
                    query = query.lt("id", before)
                if types is not None:
                    query = query.in_("event_type", list(types))
                page: list[Any] = (await query.order("id", desc=newest_first).limit(want).execute()).data
                found.extend(page)
                if len(page) < want or (limit is not None and len(found) >= limit):
                    break
                if newest_first:
                    before = page[-1]["id"]
                else:
                    after = page[-1]["id"]
            if newest_first:
                found.reverse()
            return [rows.record(StoredEvent, r) for r in found]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        params = {"p_session_id": session_id}
        return await self._rpc(
            "chat_session", params, lambda row: None if row is None else rows.record(SessionRecord, row)
        )

    async def list_sessions(self, *, limit: int, owner_id: str | None = None) -> list[SessionRecord]:
        params = {"p_limit": limit, "p_owner_id": owner_id}
        return await self._rpc("chat_sessions", params, lambda found: [rows.record(SessionRecord, r) for r in found])

    async def end_session(self, session_id: str, *, end_time: datetime) -> None:
        with _mapped_errors():
            query = self._client.table("sessions").update(
                {"end_time": rows.ts(end_time)}, returning=ReturnMethod.minimal
            )
            await query.eq("session_id", session_id).execute()

    async def summary_state(self, session_id: str) -> SummaryState | None:
        return await self._rpc(
            "chat_summary_state",
            {"p_session_id": session_id},
            lambda row: None if row is None else rows.summary_state(row),
        )

    async def save_summary(self, session_id: str, *, summary: str, through_event_id: int, end_time: datetime) -> bool:
        params = {
            "p_session_id": session_id,
            "p_summary": without_nul(summary),
            "p_through_event_id": through_event_id,
            "p_end_time": rows.ts(end_time),
        }
        return await self._rpc("chat_save_summary", params, lambda saved: saved is True)

    async def sessions_needing_summary(self, *, stale_before: datetime, limit: int) -> list[SummaryState]:
        params = {"p_stale_before": rows.ts(stale_before), "p_limit": limit}
        return await self._rpc(
            "chat_sessions_needing_summary", params, lambda found: [rows.summary_state(r) for r in found]
        )

    async def ended_sessions(
        self, *, started_after: datetime | None = None, started_before: datetime | None = None, limit: int
    ) -> list[SummaryState]:
        params = {
            "p_started_after": rows.ts(started_after),
            "p_started_before": rows.ts(started_before),
            "p_limit": limit,
        }
        return await self._rpc("chat_ended_sessions", params, lambda found: [rows.summary_state(r) for r in found])

    async def ping(self) -> None:
        with _mapped_errors():
            await self._client.table("sessions").select("session_id").limit(1).execute()

    async def close(self) -> None:
        await self._http.aclose()
