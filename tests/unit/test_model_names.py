"""One model-name rule (schemas/names.py), and every place that checks a model name applies it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import GatewaySettings
from gateway.inputs import parse_body_params, parse_params
from gateway.problems import Problem
from model_store.catalog import ModelCatalog, ModelNotFound
from model_store.watch import RoutingTable
from schemas.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN, valid_model_name

VALID = ["yolov4-tiny", "yolov5", "a", "0", "ssd_mobilenet.v2", "m-1.2_3", "x." * 32, "a" * MODEL_NAME_MAX, "v1."]
INVALID = ["YoloV5", "x..y", "..", ".", "", ".x", "-x", "_x", "a/b", "a\\b", "a b", "a\n", "modèle", "a:b",
           "a" * (MODEL_NAME_MAX + 1), "x..", "../etc"]


@pytest.mark.parametrize("name", VALID)
def test_the_rule_accepts(name: str) -> None:
    assert valid_model_name(name)


@pytest.mark.parametrize("name", INVALID)
def test_the_rule_refuses(name: str) -> None:
    assert not valid_model_name(name)


def test_non_strings_are_not_names() -> None:
    for value in (None, 5, ["yolov5"], b"yolov5"):
        assert not valid_model_name(value)


@pytest.mark.parametrize("name", VALID + INVALID)
def test_the_published_pattern_says_the_same(name: str) -> None:
    """The OpenAPI document carries the pattern and maxLength: a client validating by them agrees with us."""
    ecma = MODEL_NAME_PATTERN.removesuffix("$") + r"\Z"  # ECMA-262's $ never matches before a final newline
    published = re.search(ecma, name) is not None and len(name) <= MODEL_NAME_MAX
    assert published == valid_model_name(name)


# ---- the gateway ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INVALID)
def test_the_gateway_refuses_what_the_rule_refuses(name: str) -> None:
    settings = GatewaySettings.from_env({})
    with pytest.raises(Problem) as info:
        parse_params({"model": name}, settings, None)
    assert info.value.code == "INVALID_PARAMS"
    with pytest.raises(Problem) as info:
        parse_body_params({"model": {"name": name}}, settings, None)
    assert info.value.code == "INVALID_PARAMS"


@pytest.mark.parametrize("name", VALID)
def test_the_gateway_takes_what_the_rule_takes(name: str) -> None:
    assert parse_params({"model": name}, GatewaySettings.from_env({}), None).model == name


def test_the_gateway_default_model_is_the_setting() -> None:
    settings = GatewaySettings.from_env({"DETECTFLOW_DEFAULT_MODEL": "ppe-v2"})
    assert parse_params({}, settings, None).model == "ppe-v2"
    assert parse_body_params({}, settings, None).model == "ppe-v2"


# ---- the registry -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["YoloV5", "x..y", "../etc", "a" * (MODEL_NAME_MAX + 1)])
def test_models_push_refuses_what_the_gateway_refuses(name: str, tmp_path: Path) -> None:
    from model_store.registry import Registry, RegistryError

    registry = Registry(None, None, None)  # type: ignore[arg-type]  # the name is checked before anything is read
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.push(name, tmp_path, actor="a", gate=lambda *a: {"passed": True})


# ---- the catalog ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["YoloV5", "x..y", "a/b"])
def test_the_catalog_refuses_what_the_rule_refuses(name: str, tmp_path: Path) -> None:
    (tmp_path / name.replace("/", "_") / "1").mkdir(parents=True)
    catalog = ModelCatalog(tmp_path, table=RoutingTable())
    with pytest.raises(ModelNotFound, match="invalid model name"):
        catalog.check(name, 1)
    with pytest.raises(ModelNotFound, match="invalid model name"):
        catalog.get(name, 1)
    assert catalog.versions(name) == []


def test_the_default_model_is_named_in_the_settings_only() -> None:
    """The default model comes from PipelineSettings.default_model (DETECTFLOW_DEFAULT_MODEL) wherever a request
    names none: no layer below the settings spells out a model name of its own."""
    import ast

    from config import PipelineSettings

    root = Path(__file__).resolve().parents[2]
    default = PipelineSettings.from_env({}).default_model
    found = [f"{path.relative_to(root)}:{node.lineno}"
             for package in ("stream", "processors", "gateway", "schemas")
             for path in sorted((root / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and node.value == default]
    assert found == []


@pytest.mark.parametrize("name", ["YoloV5", "x..y"])
def test_the_gateway_refuses_to_start_with_a_default_model_that_is_not_a_name(name: str) -> None:
    from config import SettingsError
    from gateway.app import create_app

    with pytest.raises(SettingsError, match="DETECTFLOW_DEFAULT_MODEL"):
        create_app(GatewaySettings.from_env({"DETECTFLOW_DEFAULT_MODEL": name}))
    create_app(GatewaySettings.from_env({"DETECTFLOW_DEFAULT_MODEL": "ppe-v2"}))  # registers routes only
