"""Driver-level SQL for the writer's hot paths (records, patient index, routing).

Driver-level statements, like the hot path of exchange.store.messages:
SQLAlchemy's per-statement cost (~0.7 ms per executemany here) was most of
what save cost. On SQLite, executemany on the sqlite3 cursor (and one
INSERT per new row where its id is needed: no round trips there). On
PostgreSQL, ONE statement per table and kind whatever the number of rows
(each column bound as one array: ``INSERT ... SELECT FROM unnest``,
``UPDATE ... FROM unnest``, ``DELETE ... USING unnest``; psycopg's
executemany cost ~0.1 ms of Python per row), all in ONE pipeline for the
whole save: the server is only waited for where new ids are needed
(persons, records, documents) and at the end. An UPDATE/DELETE joins each
target row at most once: the keys of ``state.dirty()`` are distinct.

Values are bound exactly as SQLAlchemy's column types bind them, so what is
stored (and read back) does not change: JSON columns as ``json.dumps`` text
(None too: SQLAlchemy's JSON stores it as JSON ``null``), cast to the
column's type on PostgreSQL; on SQLite UTCDateTime as SQLAlchemy's DATETIME
text, Date as ISO text and Boolean as 0/1.
"""
from __future__ import annotations

import json
from datetime import date
from typing import Any

from sqlalchemy import JSON, Boolean, Connection, Date, DateTime
from sqlalchemy.dialects import postgresql

from exchange.store.db import driver_cursor, sqlite_datetime
from exchange.store.schema import UTCDateTime


PG_DIALECT = postgresql.dialect()


class Row:
    """A fetched row with attribute access (the driver-level selects below)."""

    __slots__ = ("__dict__",)

    def __init__(self, names: tuple[str, ...], values: tuple) -> None:
        self.__dict__.update(zip(names, values))


def select_rows(conn: Connection, columns: tuple[str, ...] | None, sql: str, params: list) -> list:
    """Rows of a driver-level SELECT (the load path: no SQLAlchemy statement per call)."""
    with driver_cursor(conn, sql) as cursor:
        if conn.dialect.name == "sqlite":
            cursor.execute(sql, params)
        else:  # never a generic plan made on a small table (see exchange.store.messages.find_prior)
            cursor.execute(sql, params, prepare=False)
        fetched = cursor.fetchall()
    return fetched if columns is None else [Row(columns, r) for r in fetched]


def in_pairs(sqlite: bool, columns: str, pairs: list[tuple[str, str]], params: list) -> str:
    """``(a, b) IN (pairs)``; appends the parameters.

    SQLite scans the whole table for a row-value ``IN (VALUES ...)`` (2.6 ms
    at 20,000 records, growing); an OR of equalities is one index search per
    pair (7 µs)."""
    if sqlite:
        params.extend(x for pair in pairs for x in pair)
        a, b = columns.split(", ")
        return "(" + " OR ".join([f"({a} = ? AND {b} = ?)"] * len(pairs)) + ")"
    params.extend(([a for a, _ in pairs], [b for _, b in pairs]))
    return f"({columns}) IN (SELECT * FROM unnest(%b::text[], %b::text[]))"


def in_ids(sqlite: bool, column: str, ids: list[int], params: list) -> str:
    if sqlite:
        params.extend(ids)
        return f"{column} IN ({', '.join(['?'] * len(ids))})"
    params.append(ids)
    return f"{column} = ANY(%b::bigint[])"


def column_kinds(table: Any) -> dict[str, str]:
    kinds = {}
    for col in table.c:
        if isinstance(col.type, JSON):
            kinds[col.name] = "json"
        elif isinstance(col.type, UTCDateTime):
            kinds[col.name] = "datetime"
        elif isinstance(col.type, Boolean):
            kinds[col.name] = "bool"
        elif isinstance(col.type, Date) and not isinstance(col.type, DateTime):
            kinds[col.name] = "date"
        else:
            kinds[col.name] = ""
    return kinds


class Statement:
    """A driver-level INSERT/UPDATE/DELETE of one table for one dialect, with its value converters."""

    __slots__ = ("sql", "names", "convert", "prepare")

    def __init__(self, sqlite: bool, table: Any, kind: str, columns: tuple[str, ...],
                 where: tuple[str, ...] = (), returning: bool = False) -> None:
        kinds = column_kinds(table)

        if sqlite:
            cond = " AND ".join(f"{name} = ?" for name in where)
            if kind == "insert":
                sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            elif kind == "update":
                sql = f"UPDATE {table.name} SET {', '.join(f'{name} = ?' for name in columns)} WHERE {cond}"
            else:
                sql = f"DELETE FROM {table.name} WHERE {cond}"
        else:
            # One statement per call: each column one array, cast to the column's type.
            names = columns + where
            arrays = ", ".join(f"CAST(%b AS {table.c[name].type.compile(dialect=PG_DIALECT)}[])" for name in names)
            cond = " AND ".join(f"t.{name} = u.{name}" for name in where)
            if kind == "insert":
                sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)}"
                       f" FROM unnest({arrays}) WITH ORDINALITY AS u ({', '.join(columns)}, ord) ORDER BY ord")
                if returning:  # ids ascend in array order (see exchange.store.messages._pg_insert_sql)
                    sql = f"WITH new AS ({sql} RETURNING id) SELECT id FROM new ORDER BY id"
            elif kind == "update":
                sql = (f"UPDATE {table.name} AS t SET {', '.join(f'{name} = u.{name}' for name in columns)}"
                       f" FROM unnest({arrays}) AS u ({', '.join(names)}) WHERE {cond}")
            else:
                sql = f"DELETE FROM {table.name} AS t USING unnest({arrays}) AS u ({', '.join(names)}) WHERE {cond}"
        self.sql = sql
        self.names = columns + where
        converters = []
        for name in self.names:
            k = kinds[name]
            if k == "json":
                converters.append(json.dumps)
            elif sqlite and k == "datetime":
                converters.append(sqlite_datetime)
            elif sqlite and k == "bool":
                converters.append(int)
            elif sqlite and k == "date":
                converters.append(date.isoformat)
            else:
                converters.append(None)
        self.convert = tuple(converters)
        # PostgreSQL: a join with the table is never a prepared statement (a
        # generic plan made on a small table keeps scanning it as it grows;
        # see exchange.store.messages.find_prior); an INSERT gains from one.
        self.prepare = None if kind == "insert" else False

    def arrays(self, rows: list[dict[str, Any]]) -> list[list]:
        """PostgreSQL: the rows as one list per column."""
        return [list(column) for column in zip(*(self.params(row) for row in rows))]

    def params(self, row: dict[str, Any]) -> tuple:
        return tuple(
            row[name] if f is None or (row[name] is None and f is not json.dumps) else f(row[name])
            for name, f in zip(self.names, self.convert)
        )


class Writer:
    """A driver cursor writing rows: executemany, inserts returning ids, deletes by ids."""

    def __init__(self, cursor: Any, sqlite: bool, statements: dict[str, Statement]) -> None:
        """``statements``: name -> Statement, built for this cursor's dialect."""
        self.cursor = cursor
        self.sqlite = sqlite
        self.statements = statements

    def many(self, name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            st = self.statements[name]
            if self.sqlite:
                self.cursor.executemany(st.sql, [st.params(row) for row in rows])
            else:
                self.cursor.execute(st.sql, st.arrays(rows), prepare=st.prepare)

    def insert_ids(self, name: str, rows: list[dict[str, Any]]) -> list[int]:
        """Insert ``rows``; their new ids, in order."""
        if not rows:
            return []
        st = self.statements[name]
        cursor = self.cursor
        if self.sqlite:
            ids = []
            for row in rows:
                cursor.execute(st.sql, st.params(row))
                ids.append(cursor.lastrowid)
            return ids
        # A cursor of its own: inside the pipeline, the shared one may still
        # be owed the results of statements queued before.
        with cursor.connection.cursor() as returning:
            returning.execute(st.sql, st.arrays(rows), prepare=st.prepare)
            ids = [r[0] for r in returning.fetchall()]
        if len(ids) != len(rows):  # pragma: no cover - a driver bug, not a data problem
            raise RuntimeError(f"inserted {len(rows)} rows, got {len(ids)} ids")
        return ids

    def delete_ids(self, table: Any, column: str, ids: list[int]) -> None:
        if ids:
            params: list = []
            where = in_ids(self.sqlite, column, ids, params)
            self.cursor.execute(f"DELETE FROM {table.name} WHERE {where}", params)


__all__ = ["PG_DIALECT", "Row", "Statement", "Writer", "column_kinds", "in_ids", "in_pairs", "select_rows"]
