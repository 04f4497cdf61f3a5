"""Pytest fixtures for the Supabase stand-in (tests/supabase_server.py on tests/postgres.py).

Import them where they are used: `from supabase_fixtures import postgres_dsn, supabase  # noqa: F401`
(in a test module, or in conftest.py to share them with every test).
- `postgres_dsn` (session): a throwaway PostgreSQL 15 cluster's DSN, with prelude.sql and the BrightRun app's
  migration applied (`apply_schema`). Started once per session (about a second), stopped and removed at its end.
- `supabase` (function): a started `SupabaseServer` on that database, its tables emptied first; closed after the
  test. `supabase.url` is SUPABASE_URL, `supabase.service_key` SUPABASE_SERVICE_ROLE_KEY (`supabase.env` has both).
"""

import pytest

from postgres import running_postgres
from supabase_server import SupabaseServer, apply_schema, truncate_tables


@pytest.fixture(scope="session")
def postgres_dsn():
    with running_postgres() as dsn:
        apply_schema(dsn)
        yield dsn


@pytest.fixture
def supabase(postgres_dsn):
    truncate_tables(postgres_dsn)
    with SupabaseServer(postgres_dsn) as server:
        yield server
