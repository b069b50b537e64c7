"""The model-name rule: the one check of a model name, for the gateway, the registry, the catalog, the bridge
and the client.

A model name is 1 to 64 characters of lowercase ASCII letters, digits, ``.``, ``_`` and ``-``; it starts with a
letter or a digit and holds no ``..``. Why: it is a folder of the model repository
(``<models_dir>/<name>/<version>``) and an object prefix in MinIO (``models/<name>/<version>/``), so it cannot
climb out (``/``, ``..``) and must not depend on a filesystem's case folding (``YoloV5`` and ``yolov5`` would be
one folder on some and two on others); it is the key of the compacted `models` topic, where
``<name>/<version>/<instance>`` keys are serving reports, so it holds no ``/``; it is a Prometheus label and a
Cassandra text key, which take any of these. Nothing is normalised: a name that breaks the rule is refused
everywhere, with the same message (docs/models.md, "Bring your own ONNX detector").
"""

from __future__ import annotations

import re

MODEL_NAME_MAX = 64
# Without lookarounds, so that the OpenAPI document can carry it as it is (with maxLength MODEL_NAME_MAX): after
# the first character, each '.' is followed by a character that is not one, or ends the name.
MODEL_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9_-]|\.[a-z0-9_-])*\.?$"
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
MODEL_NAME_RULE = ("a model name is 1-64 lowercase letters, digits, '.', '_' or '-', starts with a letter or digit "
                   "and has no '..'")


def valid_model_name(name: object) -> bool:
    """Whether ``name`` is a model name (a str that follows the rule above)."""
    return isinstance(name, str) and len(name) <= MODEL_NAME_MAX and MODEL_NAME_RE.fullmatch(name) is not None
