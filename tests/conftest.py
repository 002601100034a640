"""Shared test setup: offline switches, fixture paths, one Prefect test server per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rs5m.cli import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    if _key != "PREFECT_LOGGING_LEVEL":  # tests keep Prefect's own logs
        os.environ.setdefault(_key, _value)

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT.parent / "shared" / "fixtures"
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The shared real-data fixtures; tests using them skip when the folder is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (a plain clone has none)")
    return FIXTURES


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for every in-process flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for running ``rs5m`` in a subprocess with its own Prefect home."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PYTHONUNBUFFERED"] = "1"
    return env
