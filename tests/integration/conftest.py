"""Integration tests run against the real local stack (`detectflow stack up`).

The session fixture brings the stack up (installing it on first use) and, at the
end, stops only the services this test session started, so a developer's
running stack is left alone and CI leaves nothing behind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import PipelineSettings, StackSettings
from infra.stack import manager
from stream.serde import AvroSerde


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that restart the stack go last so they do not slow every other test.
    items.sort(key=lambda item: item.get_closest_marker("restart") is not None)


@pytest.fixture(scope="session")
def stack() -> Iterator[StackSettings]:
    settings = StackSettings.from_env()
    before = {h.name for h in manager.status(settings) if h.running}
    manager.up(settings)
    from model_kit import drop_suite_state, reset_suite_registry

    reset_suite_registry(settings)
    yield settings
    from stream_kit import close_readers, delete_test_topics

    from stream.cassandra import shutdown_clusters

    close_readers()
    delete_test_topics(settings)
    drop_suite_state(PipelineSettings.from_env())
    shutdown_clusters()  # sessions fixtures and helpers still hold, before Cassandra may stop
    started_here = [h.name for h in manager.status(settings) if h.running and h.name not in before]
    if started_here:
        manager.down(settings, started_here)


# Helpers shared by the integration tests live beside them (stream_kit.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- fixtures several test modules share (a module may define its own under the same name) ----------------------
@pytest.fixture
def prefix(stack: StackSettings) -> str:
    """A topic prefix of this test's own, its pipeline topics made."""
    from stream_kit import make_topics, new_prefix

    p = new_prefix()
    make_topics(stack, p)
    return p


@pytest.fixture(scope="module")
def serde(stack: StackSettings) -> AvroSerde:
    return AvroSerde.from_url(stack.registry_url, stack.tls_ca_file)


@pytest.fixture(scope="module")
def cql() -> Iterator[Any]:
    """A session as the gateway's Cassandra role (what the gateway itself can read)."""
    from stream.cassandra import connect

    session = connect(PipelineSettings.from_env().stream, "gateway")
    yield session
    session.cluster.shutdown()
