"""`python -m infra.cli ...`: how the supervisor starts each role (`python -m infra.cli run <role>`)."""

import sys

from infra.cli import main

sys.exit(main())
