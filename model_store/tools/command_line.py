"""What the offline tools' own command lines (``python -m model_store.tools.<tool>``) share: ``-h`` as well as
``--help``, and the exit code the command returns rather than click's 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def invoke(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> int:
    """Run ``command`` with ``argv`` (default: the process's arguments) and return its exit code: what its callback
    returns, 0 after --help, 2 for a usage error (shown with the usage line), 130 on Ctrl-C."""
    try:
        return int(command.main(args=None if argv is None else list(argv), prog_name=prog_name,
                                standalone_mode=False) or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # click's name for Ctrl-C
        return 130
