"""Every setting detectflow reads, in one place at the bottom of the layers (docs/architecture.md).

Nothing else reads ``os.environ``: a deployable builds its settings once (``X.from_env()``) and passes them
down. Each class is one concern; each field is declared once with its type, bounds, default, variable and doc.
Secrets are never part of a repr and never logged. This package imports nothing else of detectflow's.
"""

from config.base import ENV_PREFIX, Settings, SettingsError
from config.credentials import Login, MinioCredentials, write_private
from config.gateway import UPLOAD_GRACE_S, GatewaySettings
from config.pipeline import REVIEW_RETENTION_DAYS, LifecycleSettings, PipelineSettings
from config.stack import StackSettings, Versions
from config.stream import StreamSettings, kafka_client

__all__ = [
    "ENV_PREFIX",
    "REVIEW_RETENTION_DAYS",
    "UPLOAD_GRACE_S",
    "GatewaySettings",
    "LifecycleSettings",
    "Login",
    "MinioCredentials",
    "PipelineSettings",
    "Settings",
    "SettingsError",
    "StackSettings",
    "StreamSettings",
    "Versions",
    "kafka_client",
    "write_private",
]
