"""A stage process for the kill -9 and poison tests:
`python stage_worker.py PREFIX DELAY_S [--exactly-once] [--crash-on REQUEST_ID]`."""

from __future__ import annotations

import sys

from config import StackSettings
from stream.runtime import StageRunner

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from stream_kit import EchoStage, stream_settings


def main() -> None:
    prefix, delay = sys.argv[1], float(sys.argv[2])
    settings = stream_settings(StackSettings.from_env(), prefix, max_batch=20)
    crash_on = sys.argv[sys.argv.index("--crash-on") + 1] if "--crash-on" in sys.argv else ""
    runner = StageRunner(EchoStage(prefix, delay_s=delay, crash_on=crash_on), settings,
                         exactly_once="--exactly-once" in sys.argv)
    runner.install_signal_handlers()
    print("ready", flush=True)
    runner.run()


if __name__ == "__main__":
    main()
