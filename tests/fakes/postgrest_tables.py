"""Table requests for the PostgREST stand-in (tests/fakes/postgrest.py), translated to SQL: used by tests only."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from core.store.migrate import PgConnection

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMPARE = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_IS = {"null": "null", "true": "true", "false": "false", "unknown": "unknown"}


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Refused(Exception):
    """A request answered with an error body shaped like PostgREST's (or, for `gateway`, like Supabase's gateway)."""

    def __init__(
        self, status: int, code: str, message: str, *, details: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.hint = status, code, message, details, hint

    def response(self) -> web.Response:
        body: dict[str, Any] = {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}
        if not self.code:  # the API gateway's answers carry no code
            body = {"message": self.message, "hint": self.hint}
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", charset="utf-8"
        )


def unsupported(what: str) -> Refused:
    return Refused(400, "PGRST100", f"the PostgREST stand-in does not implement {what}")


@dataclass
class Table:
    name: str
    columns: dict[str, str]  # name -> SQL type
    primary_key: list[str]


def json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Refused(400, "PGRST102", "Empty or invalid json") from e


def split_list(text: str) -> list[str]:
    """The items of PostgREST's `(a,"b,c",d)` list syntax: double quotes protect commas, backslash escapes."""
    if not (text.startswith("(") and text.endswith(")")):
        raise Refused(400, "PGRST100", f'"failed to parse filter (in.{text})"')
    items: list[str] = []
    current, quoted, escaped, was_quoted = "", False, False, False
    for char in text[1:-1]:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted, was_quoted = not quoted, True
        elif char == "," and not quoted:
            items.append(current if was_quoted else current.strip())
            current, was_quoted = "", False
        else:
            current += char
    if text != "()":
        items.append(current if was_quoted else current.strip())
    return items


_ORDER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.(asc|desc))?(?:\.(nullsfirst|nullslast))?")


class Statement:
    """One request on a table, as one SQL statement over `_r` with the filters as parameters."""

    def __init__(
        self, table: Table, schema: str, query: list[tuple[str, str]], prefer: set[str], method: str, body: bytes
    ) -> None:
        self.table, self.prefer, self.method, self.body = table, prefer, method, body
        self.qualified = f"{ident(schema)}.{ident(table.name)}"
        self.params: list[Any] = []
        self.filters: list[str] = []
        self.select: list[str] | None = None
        self.order: list[str] = []
        self.limit: int | None = None
        self.offset: int | None = None
        self.on_conflict: list[str] | None = None
        self.columns: list[str] | None = None
        for key, value in query:
            self._parse(key, value)

    def _column(self, name: str) -> str:
        if name not in self.table.columns:
            raise Refused(400, "42703", f"column {self.table.name}.{name} does not exist")
        return name

    def _param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def _parse(self, key: str, value: str) -> None:
        if key == "select":
            names = [c.strip().strip('"') for c in value.split(",")]
            if not all(n == "*" or NAME.fullmatch(n) for n in names):
                raise unsupported("embedding, aliases, casts or JSON paths in select")
            self.select = [n if n == "*" else self._column(n) for n in names]
        elif key == "order":
            for item in value.split(","):
                match = _ORDER.fullmatch(item.strip())
                if match is None:
                    raise Refused(400, "PGRST100", f'"failed to parse order ({value})"')
                column, direction, nulls = match.groups()
                nulls_sql = {"nullsfirst": " nulls first", "nullslast": " nulls last", None: ""}[nulls]
                self.order.append(f"_r.{ident(self._column(column))} {direction or 'asc'}{nulls_sql}")
        elif key in ("limit", "offset"):
            if not value.isdigit():
                raise Refused(400, "PGRST100", f'"failed to parse {key} ({value})"')
            setattr(self, key, int(value))
        elif key in ("on_conflict", "columns"):
            setattr(self, key, [self._column(c) for c in split_list(f"({value})")])
        elif not NAME.fullmatch(key):
            raise unsupported(f"the query parameter {key!r}")
        else:
            self.filters.append(self._filter(self._column(key), value))

    def _filter(self, column: str, value: str) -> str:
        op, dot, operand = value.partition(".")
        target, type_ = f"_r.{ident(column)}", self.table.columns[column]
        if not dot:
            raise Refused(400, "PGRST100", f'"failed to parse filter ({value})"')
        if op in _COMPARE:
            return f"{target} {_COMPARE[op]} ({self._param(operand)}::text)::{type_}"
        if op == "is" and operand in _IS:
            return f"{target} is {_IS[operand]}"
        if op == "in":
            return f"{target} = any(({self._param(split_list(operand))}::text[])::{type_}[])"
        raise unsupported(f"the filter operator {op!r}")

    def _returning(self) -> str:
        if self.select is None or "*" in self.select:
            return "_r.*"
        return ", ".join(f"_r.{ident(c)}" for c in self.select)

    async def run(self, conn: PgConnection, become: Callable[[], Awaitable[None]]) -> web.Response:
        """Run as the request's role (`become()` switches to it, after the catalog look-ups)."""
        reading = self.method in ("GET", "HEAD")
        if reading and (self.on_conflict or self.columns):
            raise unsupported("on_conflict or columns when reading")
        modifiers = self.order or self.limit is not None or self.offset is not None
        if not reading and (modifiers or "count=exact" in self.prefer):
            raise unsupported("order, limit, offset or count on writes")
        if self.method != "POST" and (self.on_conflict or any(p.startswith("resolution=") for p in self.prefer)):
            raise unsupported("on_conflict or resolution outside an insert")
        await become()
        if reading:
            return await self._read(conn)
        if self.method == "POST":
            sql = self._insert()
        elif self.method == "PATCH":
            sql = self._update()
        elif self.method == "DELETE":
            if not self.filters:
                raise Refused(400, "21000", "DELETE requires a WHERE clause", hint="pg-safeupdate is enabled")
            sql = f"delete from {self.qualified} as _r where {' and '.join(self.filters)}"
        else:
            raise Refused(405, "PGRST117", f"Unsupported HTTP method: {self.method}")
        status = 201 if self.method == "POST" else 200
        if "return=representation" in self.prefer:
            row = await conn.fetchrow(
                f"with _t as ({sql} returning {self._returning()}) select coalesce(json_agg(_t), '[]')::text, count(*)"
                " from _t",
                *self.params,
            )
            assert row is not None  # an aggregate always has a row
            rows, count = row
            return _answer(status, rows, self._written_range(count))
        # No RETURNING, as PostgREST does for return=minimal: it would need the row to pass the select policies.
        count = int((await conn.execute(sql, *self.params)).split()[-1])
        return _answer(201 if self.method == "POST" else 204, None, self._written_range(count))

    def _written_range(self, count: int) -> str:
        # PostgREST gives no range for an insert; for an update or delete, the rows it touched.
        return "*/*" if self.method == "POST" or not count else f"0-{count - 1}/*"

    async def _read(self, conn: PgConnection) -> web.Response:
        where = " and ".join(self.filters) or "true"
        tail = "".join(
            [
                f" order by {', '.join(self.order)}" if self.order else "",
                f" limit {self.limit}" if self.limit is not None else "",
                f" offset {self.offset}" if self.offset is not None else "",
            ]
        )
        row = await conn.fetchrow(
            f"select coalesce(json_agg(_t), '[]')::text, count(*)"
            f" from (select {self._returning()} from {self.qualified} _r where {where}{tail}) _t",
            *self.params,
        )
        assert row is not None  # an aggregate always has a row
        rows, count = row
        total = None
        if "count=exact" in self.prefer:
            total = await conn.fetchval(f"select count(*) from {self.qualified} _r where {where}", *self.params)
        first = self.offset or 0
        content_range = f"{f'{first}-{first + count - 1}' if count else '*'}/{'*' if total is None else total}"
        status = 206 if total is not None and count < total else 200
        return _answer(status, None if self.method == "HEAD" else rows, content_range)

    def _payload(self, *, many: bool) -> tuple[list[str], str]:
        """The columns a write sets and its JSON body (rows for an insert, one object for an update)."""
        payload = json_body(self.body)
        rows = [payload] if isinstance(payload, dict) else payload
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or (not many and len(rows) != 1):
            raise Refused(400, "PGRST102", "the stand-in takes a JSON object, or for inserts an array of objects")
        keys = self.columns or (list(rows[0]) if rows else [])
        if self.columns is None and any(set(r) != set(keys) for r in rows):
            raise Refused(400, "PGRST102", "All object keys must match")
        for key in keys:
            if key not in self.table.columns:
                message = f"Could not find the '{key}' column of '{self.table.name}' in the schema cache"
                raise Refused(400, "PGRST204", message)
        if not keys:
            raise unsupported("writes that set no column")
        return keys, orjson.dumps(rows if many else rows[0]).decode()

    def _definition(self, keys: list[str]) -> str:
        return ", ".join(f"{ident(k)} {self.table.columns[k]}" for k in keys)

    def _insert(self) -> str:
        keys, body = self._payload(many=True)
        columns = ", ".join(ident(k) for k in keys)
        sql = (
            f"insert into {self.qualified} as _r ({columns}) select {columns}"
            f" from json_to_recordset({self._param(body)}::json) as _({self._definition(keys)})"
        )
        if "resolution=ignore-duplicates" in self.prefer or "resolution=merge-duplicates" in self.prefer:
            target = ", ".join(ident(c) for c in (self.on_conflict or self.table.primary_key))
            updates = ", ".join(f"{ident(k)} = excluded.{ident(k)}" for k in keys)
            merge = "resolution=merge-duplicates" in self.prefer
            sql += f" on conflict ({target}) " + (f"do update set {updates}" if merge else "do nothing")
        elif self.on_conflict:
            raise unsupported("on_conflict without Prefer: resolution=...")
        return sql

    def _update(self) -> str:
        if not self.filters:
            raise Refused(400, "21000", "UPDATE requires a WHERE clause", hint="pg-safeupdate is enabled")
        keys, body = self._payload(many=False)
        sets = ", ".join(f"{ident(k)} = _p.{ident(k)}" for k in keys)
        where = " and ".join(self.filters)
        return (
            f"update {self.qualified} as _r set {sets}"
            f" from json_to_record({self._param(body)}::json) as _p({self._definition(keys)}) where {where}"
        )


def _answer(status: int, body: str | None, content_range: str) -> web.Response:
    headers = {"Content-Range": content_range}
    if body is None:
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, text=body, content_type="application/json", charset="utf-8", headers=headers)
