"""``python -m agent.cli``: the same as ``agentctl``."""

import sys

from agent.cli import main

sys.exit(main())
