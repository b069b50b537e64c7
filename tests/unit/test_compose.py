"""docker-compose.yml cannot run here (no Docker engine); keep it complete and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import Versions
from infra.roles import ROLES
from infra.stack.manager import SERVICE_CLASSES
from infra.supervisor import ROLE_MALLOC_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_local_stack_service_is_in_compose(compose: dict) -> None:
    assert set(SERVICE_CLASSES) <= set(compose["services"])


@pytest.mark.parametrize("name", list(SERVICE_CLASSES))
def test_service_has_image_or_build_and_healthcheck(compose: dict, name: str) -> None:
    svc = compose["services"][name]
    assert "image" in svc or "build" in svc, f"{name} has neither image nor build"
    if "build" in svc:
        build = svc["build"]
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.exists(), f"{name}: {dockerfile} missing"
    check = svc.get("healthcheck", {}).get("test")
    assert check and check[0] in {"CMD", "CMD-SHELL"}, f"{name} has no health check"


def test_depends_on_matches_the_local_stack(compose: dict) -> None:
    from config import StackSettings
    from infra.stack.manager import load_services

    for svc in load_services(StackSettings(home=Path("/nonexistent"))):
        declared = compose["services"][svc.name].get("depends_on", {})
        for dep in svc.depends_on:
            assert dep in declared, f"{svc.name} must depend_on {dep}"
            assert declared[dep]["condition"] == "service_healthy"


def test_depends_on_targets_exist_and_have_no_cycle(compose: dict) -> None:
    services = compose["services"]
    graph = {name: list(svc.get("depends_on", {})) for name, svc in services.items()}
    for name, deps in graph.items():
        for dep in deps:
            assert dep in services, f"{name} depends on unknown {dep}"
    seen: dict[str, int] = {}

    def visit(node: str) -> None:
        assert seen.get(node) != 1, f"dependency cycle through {node}"
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for dep in graph[node]:
            visit(dep)
        seen[node] = 2

    for node in graph:
        visit(node)


def test_compose_pins_the_versions_the_local_stack_installs(compose: dict) -> None:
    v = Versions()
    services = compose["services"]
    assert services["kafka"]["image"].endswith(":" + v.kafka)
    assert services["registry"]["image"].endswith(":" + v.apicurio)
    assert services["cassandra"]["image"].endswith(":" + v.cassandra)
    assert services["minio"]["build"]["args"]["MINIO_VERSION"] == v.minio


def test_volumes_declared(compose: dict) -> None:
    named = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name} uses undeclared volume {source}"


def test_every_pipeline_role_is_a_compose_service(compose: dict) -> None:
    from infra.roles import LIFECYCLE_ROLES, ROLES

    for role in (*ROLES, *LIFECYCLE_ROLES):
        svc = compose["services"][role]
        assert svc["command"] == ["detectflow", "run", role]
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert "registry" in svc["depends_on"], f"{role} decodes Avro: it needs the registry"
        assert svc["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
        env = svc["environment"]
        assert env["DETECTFLOW_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert "clamd" in compose["services"]["scan"]["depends_on"]
    image_build = compose["services"]["topics"]["build"]
    assert (ROOT / image_build["dockerfile"]).exists()


def test_the_gateway_is_a_compose_service_that_is_ready_only_with_its_backends(compose: dict) -> None:
    svc = compose["services"]["gateway"]
    assert svc["command"] == ["detectflow", "run", "gateway"]
    for dep in ("kafka", "registry", "cassandra", "minio"):
        assert svc["depends_on"][dep]["condition"] == "service_healthy", dep
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert svc["environment"]["DETECTFLOW_ALLOW_HS256"] == "false"
    assert {"minio", "jwks"} <= set(svc["secrets"]) <= set(compose["secrets"])


def test_roles_get_the_same_malloc_settings_as_under_the_supervisor(compose: dict) -> None:
    for role in (*ROLES, "gateway"):
        env = compose["services"][role]["environment"]
        assert env.get("MALLOC_ARENA_MAX") == "2", role
        want = ROLE_MALLOC_ENV.get(role, {})
        assert {k: v for k, v in env.items() if k.startswith("MALLOC_") and k != "MALLOC_ARENA_MAX"} == want, role
