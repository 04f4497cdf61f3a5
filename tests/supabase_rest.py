"""The PostgREST part of the Supabase stand-in (tests/supabase_server.py): the handler's /rest/v1 routing
(`_RestRoutes`, mixed into its `_Handler`), one request on one table (`_Rest`) run on the server's PostgreSQL,
and PostgREST's errors (`RestError`, `_pg_status`).

REST, under /rest/v1/ (`SyncPostgrestClient(f"{url}/rest/v1", headers=...)`; `_sync/request_builder.py` sends,
`base_request_builder.py` builds the query string and the Prefer header, `exceptions.py` parses errors):
- The API gateway's key check: `apikey: <service key>` and `Authorization: Bearer <service key>` on every request.
  No apikey: 401 `{"message": "No API key found in request", "hint": "No `apikey` request header or url param was
  found."}`; a wrong apikey or a missing/wrong bearer: 401 `{"message": "Invalid API key", "hint": "Double check
  your Supabase `anon` or `service_role` API key."}` (the body the gateway sends; `APIError` reads `message`).
- `GET /rest/v1/<table>?select=<*|a,b,alias:c>&<filters>&order=<col>.asc|desc[.nullsfirst|.nullslast],...
  &limit=&offset=` → 200, a JSON list (`APIResponse.data`), built by PostgreSQL's own json_agg as PostgREST
  does: timestamptz as ISO 8601 in UTC (`2026-01-10T12:00:00.123456+00:00`), uuids as strings, jsonb as JSON,
  numeric as numbers. `Content-Range: <first>-<last>/<total or *>` (the total with `Prefer: count=exact`, which
  `APIResponse.count` reads). `Accept: application/vnd.pgrst.object+json` (`.single()`) answers the one row as an
  object, or 406 PGRST116 when there are 0 or several.
- Filters (`eq`, `neq`, `gt`, `gte`, `lt`, `lte`, `like`, `ilike` (`*` as `%`), `in.(a,"b,c")`, `is.null`,
  `is.not_null`, `is.true`, `is.false`, and `not.<op>`), ANDed; values are bound as parameters of unknown type, so
  PostgreSQL casts them to the column's type (an invalid uuid fails with 22P02, as it does on Supabase).
- `PATCH /rest/v1/<table>?<filters>` with a JSON object: `UPDATE t SET (cols) = (SELECT cols FROM
  json_populate_record(NULL::t, $1)) WHERE ... RETURNING *`, as PostgREST writes it. 200 with the updated rows
  under `Prefer: return=representation` (what `.update()` sends), else 204; no row matched is 200 `[]`.
- `POST /rest/v1/<table>` with an object or a list of objects (bulk): `INSERT INTO t (cols) SELECT cols FROM
  json_populate_recordset(NULL::t, $1) RETURNING *`; the columns are the `columns=` query parameter (which
  `.insert([...])` sends: keys missing from a row are NULL), else the object's keys (a list's rows must all have
  the first row's keys, or 400 PGRST102). 201 with the rows (`return=representation`) or empty (`return=minimal`,
  and without Prefer). `Prefer: resolution=merge-duplicates|ignore-duplicates` (`.upsert()`) adds `ON CONFLICT
  (<on_conflict= or the primary key>) DO UPDATE SET ... | DO NOTHING`.
- `DELETE /rest/v1/<table>?<filters>` → 200 rows / 204, like PATCH.
- Errors as PostgREST maps them (`{"code", "details", "hint", "message"}`, which `APIError` exposes): a PostgreSQL
  error answers its SQLSTATE (`22P02` invalid integer "12.5", `23502` NOT NULL, ...) with HTTP 400, 409 for
  23503 (foreign key) and 23505 (unique), 5xx for server-side classes; an unknown table 404 PGRST205 ("Could not
  find the table 'public.<t>' in the schema cache"), an unknown body column 400 PGRST204 ("Could not find the
  '<c>' column of '<t>' in the schema cache"), an unknown filter/select/order column 400 42703, a bad body 400
  PGRST102, an unparsable filter 400 PGRST100, a schema other than public (Accept-/Content-Profile) 406 PGRST106.
  Every request is one transaction: an error rolls it back whole (a bulk insert stores no row).
- Not mimicked: RPC (`/rest/v1/rpc/...` answers 404 PGRST202), embedded resources, `or=`/`and=` groups, JSON path
  filters, `Prefer: missing=default`, `max-affected`, CSV/explain, RLS as the anon role (every request runs as the
  database superuser, which bypasses RLS as Supabase's service_role does).
"""

import json
import re
from urllib.parse import parse_qsl

import psycopg
from psycopg import sql

from supabase_common import JSON_TYPE

INVALID_KEY = {"message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."}
NO_KEY = {"message": "No API key found in request", "hint": "No `apikey` request header or url param was found."}
OBJECT_ACCEPT = "application/vnd.pgrst.object+json"


def _split_list(value: str) -> list[str]:
    """Split PostgREST's comma list (`a,"b,c",d`): double quotes group, a backslash escapes; quotes removed."""
    items, current, quoted, escaped, was_quoted = [], [], False, False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted, was_quoted = not quoted, True
        elif ch == "," and not quoted:
            items.append("".join(current) if was_quoted else "".join(current).strip())
            current, was_quoted = [], False
        else:
            current.append(ch)
    items.append("".join(current) if was_quoted else "".join(current).strip())
    return items


def _pg_status(code: str) -> int:
    """The HTTP status PostgREST answers for a PostgreSQL error's SQLSTATE (PostgREST's errors documentation)."""
    if code in ("23503", "23505"):
        return 409
    if code == "25006":
        return 405
    if code in ("42P01", "42883"):
        return 404
    if code == "42501":
        return 403
    if code == "42P17":
        return 500
    if code == "P0001":
        return 400
    return {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500,
            "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
            "P0": 500, "XX": 500}.get(code[:2], 400)


class RestError(Exception):
    def __init__(self, status: int, code: str | None, message: str, details=None, hint=None):
        super().__init__(message)
        self.status, self.body = status, {"code": code, "details": details, "hint": hint, "message": message}


class _RestRoutes:
    """The HTTP handler's /rest/v1 routing: the gateway's key check, the schema profile, the path; mixed
    into tests/supabase_server.py's `_Handler`."""

    def _rest(self, url):
        supa = self.server.supa
        apikey = self.headers.get("apikey")
        if apikey is None:
            return self._json(401, NO_KEY)
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if apikey != supa.service_key or scheme.lower() != "bearer" or token.strip() != supa.service_key:
            return self._json(401, INVALID_KEY)
        for header in ("Accept-Profile", "Content-Profile"):
            if (profile := self.headers.get(header)) not in (None, "public"):
                raise RestError(406, "PGRST106", f"Invalid schema: {profile}",
                                hint="Only the following schemas are exposed: public, graphql_public")
        rest = self._path[len("/rest/v1/"):] if self._path.startswith("/rest/v1/") else ""
        if rest.startswith("rpc/"):
            raise RestError(404, "PGRST202", f"Could not find the function public.{rest[4:]} without parameters "
                            "in the schema cache")
        if not rest or "/" in rest:
            raise RestError(404, "PGRST125", "Invalid path specified in request URL")
        if self.command not in ("GET", "HEAD", "POST", "PATCH", "DELETE"):
            raise RestError(405, "PGRST117", f"Unsupported HTTP method: {self.command}")
        _Rest(self, supa, rest, url.query).run()


class _Rest:
    """One PostgREST request on one table."""

    def __init__(self, handler: _RestRoutes, supa, table: str, query: str):
        self.h, self.supa, self.table = handler, supa, table
        self.query = parse_qsl(query, keep_blank_values=True)
        self.prefer = {p.strip() for p in handler.headers.get("Prefer", "").split(",") if p.strip()}
        self.single = OBJECT_ACCEPT in handler.headers.get("Accept", "")

    def run(self):
        method = self.h.command
        try:
            with self.supa._db() as conn:
                self.columns = self._columns(conn)
                with conn.transaction():  # one transaction per request: an error rolls it all back
                    if method in ("GET", "HEAD"):
                        status, headers, body = self._select(conn)
                    elif method == "POST":
                        status, headers, body = self._insert(conn)
                    elif method == "PATCH":
                        status, headers, body = self._update(conn)
                    else:
                        status, headers, body = self._delete(conn)
        except psycopg.Error as e:
            if e.sqlstate is None:  # no answer from PostgreSQL at all
                raise RestError(503, "PGRST000", "Database connection error", details=str(e)) from None
            d = e.diag
            raise RestError(_pg_status(e.sqlstate), e.sqlstate, d.message_primary or str(e),
                            details=d.message_detail, hint=d.message_hint) from None
        self.h._send(status, {"Content-Type": JSON_TYPE, "Content-Profile": "public", **headers}, body)

    # -- parsing -------------------------------------------------------------------------------------------------
    def _columns(self, conn) -> list[str]:
        cols = [r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = %s "
            "AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum", (self.table,))]
        if not cols:
            raise RestError(404, "PGRST205", f"Could not find the table 'public.{self.table}' in the schema cache")
        return cols

    @property
    def ident(self):
        return sql.Identifier("public", self.table)

    def _column(self, name: str):
        if name not in self.columns:
            raise RestError(400, "42703", f"column {self.table}.{name} does not exist")
        return sql.Identifier(name)

    def _select_list(self):
        value = next((v for k, v in self.query if k == "select"), "*")
        if value.strip() in ("", "*"):
            return sql.SQL("*")
        items = []
        for item in _split_list(value):
            alias, _, name = item.rpartition(":") if ":" in item and "::" not in item else ("", "", item)
            if not name or name == "*":
                if name == "*" and not alias:
                    items.append(sql.SQL("*"))
                    continue
                raise RestError(400, "PGRST100", f'"failed to parse select parameter ({value})"')
            if not re.fullmatch(r"[^()!>.\-]+", name):
                raise RestError(400, "PGRST100", f'"failed to parse select parameter ({value})"',
                                details="embedded resources, casts and JSON paths are not mimicked")
            col = self._column(name)
            items.append(sql.SQL("{} AS {}").format(col, sql.Identifier(alias)) if alias else col)
        return sql.SQL(", ").join(items)

    def _where(self):
        conds, params = [], []
        reserved = {"select", "order", "limit", "offset", "columns", "on_conflict", "apikey"}
        for key, value in self.query:
            if key in reserved:
                continue
            if key in ("or", "and", "not.or", "not.and"):
                raise RestError(400, "PGRST100", f"logic trees ({key}=) are not mimicked by the test server")
            col = self._column(key)
            expr, negate = value, False
            if expr.startswith("not."):
                expr, negate = expr[4:], True
            op, dot, arg = expr.partition(".")
            ops = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "like": "LIKE",
                   "ilike": "ILIKE"}
            if not dot:
                raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 1)')
            if op in ops:
                cond = sql.SQL("{} " + ops[op] + " {}").format(col, sql.Placeholder())
                params.append(arg.replace("*", "%") if op in ("like", "ilike") else arg)
            elif op == "in":
                if not (arg.startswith("(") and arg.endswith(")")):
                    raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 4)')
                values = _split_list(arg[1:-1]) if arg[1:-1] else []
                if values:
                    cond = sql.SQL("{} IN ({})").format(col, sql.SQL(", ").join(sql.Placeholder() * len(values)))
                    params.extend(values)
                else:
                    cond = sql.SQL("FALSE")
            elif op == "is":
                words = {"null": "IS NULL", "not_null": "IS NOT NULL", "true": "IS TRUE", "false": "IS FALSE",
                         "unknown": "IS UNKNOWN"}
                if arg.lower() not in words:
                    raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 4)')
                cond = sql.SQL("{} " + words[arg.lower()]).format(col)
            else:
                raise RestError(400, "PGRST100", f'"failed to parse filter ({value})" (line 1, column 1)',
                                details=f"operator {op!r} is not mimicked by the test server")
            conds.append(sql.SQL("NOT ({})").format(cond) if negate else cond)
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
        return where, params

    def _order_limit(self):
        parts, params = [], []
        order = next((v for k, v in self.query if k == "order"), None)
        if order:
            terms = []
            for term in order.split(","):
                name, *mods = term.split(".")
                sql_mods = []
                for m in mods:
                    if m not in ("asc", "desc", "nullsfirst", "nullslast"):
                        raise RestError(400, "PGRST100", f'"failed to parse order ({order})" (line 1, column 1)')
                    sql_mods.append({"asc": "ASC", "desc": "DESC", "nullsfirst": "NULLS FIRST",
                                     "nullslast": "NULLS LAST"}[m])
                terms.append(sql.SQL(" ").join([self._column(name), *map(sql.SQL, sql_mods)]))
            parts.append(sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms))
        for key, word in (("limit", " LIMIT "), ("offset", " OFFSET ")):
            value = next((v for k, v in self.query if k == key), None)
            if value is not None:
                if not value.isdigit():
                    raise RestError(400, "PGRST100", f'"failed to parse {key} ({value})"')
                parts.append(sql.SQL(word) + sql.Placeholder())
                params.append(int(value))
        return sql.Composed(parts), params

    def _body(self):
        try:
            return json.loads(self.h._read_body() or b"")
        except ValueError:
            raise RestError(400, "PGRST102", "Empty or invalid json") from None

    def _check_body_columns(self, names) -> list[str]:
        for name in names:
            if name not in self.columns:
                raise RestError(400, "PGRST204", f"Could not find the '{name}' column of '{self.table}' in the "
                                "schema cache")
        return list(names)

    # -- answers -------------------------------------------------------------------------------------------------
    def _result(self, conn, cte, params):
        """Run `WITH pgrst_source AS (<cte>) SELECT count, json` and shape the answer (status, headers, body)."""
        query = sql.SQL("WITH pgrst_source AS ({}) SELECT count(*), coalesce(json_agg(_pgrst_t), '[]')::text "
                        "FROM (SELECT {} FROM pgrst_source) _pgrst_t").format(cte, self._select_list())
        count, text = conn.execute(query, params).fetchone()
        if self.single and count != 1:
            raise RestError(406, "PGRST116", "JSON object requested, multiple (or no) rows returned",
                            details=f"The result contains {count} rows")
        body = json.dumps(json.loads(text)[0], separators=(",", ":")) if self.single else text
        return count, body.encode()

    def _select(self, conn):
        where, params = self._where()
        tail, tail_params = self._order_limit()
        cte = sql.SQL("SELECT * FROM {}{}{}").format(self.ident, where, tail)
        count, body = self._result(conn, cte, params + tail_params)
        total = "*"
        if any(p.startswith("count=") for p in self.prefer):
            total = str(conn.execute(sql.SQL("SELECT count(*) FROM {}{}").format(self.ident, where),
                                     params).fetchone()[0])
        offset = int(next((v for k, v in self.query if k == "offset"), "0") or 0)
        rng = f"{offset}-{offset + count - 1}/{total}" if count else f"*/{total}"
        return 200, {"Content-Range": rng}, body

    def _write_answer(self, count: int, body: bytes, created: bool):
        rng = f"*/{count}" if any(p.startswith("count=") for p in self.prefer) else "*/*"
        if "return=representation" in self.prefer:
            return (201 if created else 200), {"Content-Range": rng}, body
        return (201 if created else 204), {"Content-Range": rng}, b""

    def _update(self, conn):
        patch = self._body()
        if not isinstance(patch, dict):
            raise RestError(400, "PGRST102", "Empty or invalid json")
        cols = self._check_body_columns(patch)
        where, params = self._where()
        if not cols:  # an empty patch changes nothing and returns no row, as PostgREST
            cte = sql.SQL("SELECT * FROM {} WHERE FALSE").format(self.ident)
            params = []
        else:
            idents = sql.SQL(", ").join(map(sql.Identifier, cols))
            cte = sql.SQL("UPDATE {t} SET ({c}) = (SELECT {c} FROM json_populate_record(NULL::{t}, {p}::json)){w} "
                          "RETURNING {t}.*").format(t=self.ident, c=idents, p=sql.Placeholder(), w=where)
            params = [json.dumps(patch)] + params
        count, body = self._result(conn, cte, params)
        return self._write_answer(count, body, created=False)

    def _insert(self, conn):
        payload = self._body()
        rows = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(r, dict) for r in rows):
            raise RestError(400, "PGRST102", "Empty or invalid json")
        columns_param = next((v for k, v in self.query if k == "columns"), None)
        if columns_param is not None:
            cols = self._check_body_columns([c for c in _split_list(columns_param) if c])
        else:
            cols = self._check_body_columns(rows[0] if rows else [])
            if any(set(r) != set(cols) for r in rows[1:]):
                raise RestError(400, "PGRST102", "All object keys must match")
        if not rows:
            return self._write_answer(0, b"[]", created=True)
        if not cols:  # `{}` (or a list of them): rows of column defaults
            cte = sql.SQL("INSERT INTO {} SELECT FROM generate_series(1, {}) RETURNING *").format(
                self.ident, sql.Placeholder())
            count, body = self._result(conn, cte, [len(rows)])
            return self._write_answer(count, body, created=True)
        idents = sql.SQL(", ").join(map(sql.Identifier, cols))
        conflict = sql.SQL("")
        resolution = next((p.split("=", 1)[1] for p in self.prefer if p.startswith("resolution=")), None)
        if resolution in ("merge-duplicates", "ignore-duplicates"):
            on = next((v for k, v in self.query if k == "on_conflict"), None)
            keys = [c for c in _split_list(on) if c] if on else [r[0] for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
                (f'public."{self.table}"',))]
            key_idents = sql.SQL(", ").join(self._column(k) for k in keys)
            if resolution == "ignore-duplicates":
                conflict = sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(key_idents)
            else:
                excluded = sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in cols)
                conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET ({}) = ROW({})").format(key_idents, idents,
                                                                                             excluded)
        cte = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM json_populate_recordset(NULL::{t}, {p}::json){o} "
                      "RETURNING {t}.*").format(t=self.ident, c=idents, p=sql.Placeholder(), o=conflict)
        count, body = self._result(conn, cte, [json.dumps(rows)])
        return self._write_answer(count, body, created=True)

    def _delete(self, conn):
        where, params = self._where()
        cte = sql.SQL("DELETE FROM {}{} RETURNING *").format(self.ident, where)
        count, body = self._result(conn, cte, params)
        return self._write_answer(count, body, created=False)
