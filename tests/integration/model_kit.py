"""Model versions for the lifecycle tests, made from the converted default model with onnx tooling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from object_kit import root_minio
from onnx import TensorProto, helper, numpy_helper

from config import PipelineSettings, StackSettings
from model_store.serving.config import CONFIG_FILE, MODEL_FILE


def variant(src: Path, dst: Path, *, tag: str, slow_matmuls: int = 0) -> Path:
    """The same model (same detections) with other bytes; ``slow_matmuls`` adds real work per image
    (a chain of [416 x 416] MatMuls on the input whose sum, times zero, is added to the output)."""
    model = onnx.load(str(src / MODEL_FILE))
    onnx.helper.set_model_props(model, {"detectflow_test_variant": tag})
    if slow_matmuls:
        graph = model.graph
        out = graph.output[0].name
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == out:
                    node.output[i] = f"{out}_raw"
        width = graph.input[0].type.tensor_type.shape.dim[3].dim_value
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, -1, width], dtype=np.int64), "slow_shape"),
            numpy_helper.from_array(np.full((width, width), 1.0 / width, dtype=np.float32), "slow_w"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "slow_zero"),
        ])
        nodes = [helper.make_node("Reshape", [graph.input[0].name, "slow_shape"], ["slow_0"])]
        for k in range(slow_matmuls):
            nodes.append(helper.make_node("MatMul", [f"slow_{k}", "slow_w"], [f"slow_{k + 1}"]))
        nodes += [helper.make_node("ReduceSum", [f"slow_{slow_matmuls}"], ["slow_sum"], keepdims=0),
                  helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
                  helper.make_node("Add", [f"{out}_raw", "slow_nothing"], [out])]
        graph.node.extend(nodes)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / MODEL_FILE))
    shutil.copy(src / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


def wrong_shape(src: Path, dst: Path) -> Path:
    """A valid ONNX model with the right input whose output breaks the decoder's contract ([N, 3])."""
    config_src = src / CONFIG_FILE
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["detections"], axis=1)],
        "wrong_shape",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 416, 416])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / MODEL_FILE))
    shutil.copy(config_src, dst / CONFIG_FILE)
    return dst


def corrupt(src: Path, dst: Path) -> Path:
    """A model.onnx whose bytes are cut in the middle (a broken upload)."""
    dst.mkdir(parents=True, exist_ok=True)
    data = (src / MODEL_FILE).read_bytes()
    (dst / MODEL_FILE).write_bytes(data[: len(data) // 3])
    shutil.copy(src / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


SUITE_POLICY = "-suite-models"


def reset_suite_registry(stack: StackSettings) -> None:
    """The suite's registry (its keyspace and models bucket, never a user's) emptied, then the default model
    pushed through the release gate: v1 is production, as after `make demo` on a fresh machine."""

    from stream_kit import new_prefix

    from infra.stack.cassandra_access import grant_keyspace
    from infra.stack.kafka_access import provision
    from infra.stack.minio import admin_client, encrypt_by_default
    from infra.stack.minio_access import grant_area
    from model_store.control.registry import connect_registry
    from model_store.tools.evalset import ensure_eval_set
    from model_store.tools.gate import gate_runner
    from stream.kafka import kafka_connection

    settings = PipelineSettings.from_env()
    # The registry publishes on its own prefix's `models` topic, never the default deployment's (a user's
    # serving processes would follow the suite's routing); test pipelines republish on theirs.
    settings = settings.replace(stream=settings.stream.replace(topic_prefix=new_prefix()))
    provision(kafka_connection(settings.stream, "admin"), settings.stream.topic_prefix)
    drop_suite_state(settings)
    # The suite's keyspace is made as the admin role, and each role granted its tables there (as on the stack's).
    grant_keyspace(stack, settings.stream.keyspace)
    # The roles get the same rights on the suite's models bucket as on the stack's (an extra policy each).
    root_minio(stack).make_bucket(settings.lifecycle.models_bucket)
    encrypt_by_default(root_minio(stack), settings.lifecycle.models_bucket)
    grant_area(admin_client(stack), "models", settings.lifecycle.models_bucket, SUITE_POLICY)
    registry = connect_registry(settings)
    try:
        source = stack.models_dir / settings.default_model / "1"
        outcome = registry.push(settings.default_model, source, actor="tests",
                                gate=gate_runner(settings.lifecycle, ensure_eval_set(stack)))
        assert (outcome.version, outcome.gate_status) == (1, "PASSED"), outcome
    finally:
        registry.close()


def drop_suite_state(settings: PipelineSettings) -> None:
    """Drop the suite's keyspace and models bucket (what a killed run left, or what this run made)."""
    from minio.deleteobjects import DeleteObject

    from infra.stack.cassandra_access import drop_keyspace
    from infra.stack.minio import admin_client
    from infra.stack.minio_access import revoke_area

    assert settings.stream.keyspace != "detectflow" and settings.lifecycle.models_bucket != "models", \
        "the suite's own state must be configured (tests/conftest.py) before anything is dropped"
    drop_keyspace(StackSettings.from_env(), settings.stream.keyspace)
    client = root_minio(StackSettings.from_env())
    bucket = settings.lifecycle.models_bucket
    if client.bucket_exists(bucket):
        doomed = [DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True)]
        errors = list(client.remove_objects(bucket, doomed))
        assert not errors, errors
        client.remove_bucket(bucket)
    revoke_area(admin_client(StackSettings.from_env()), SUITE_POLICY)
