"""``python -m noc``: the NOC's command line (also installed as ``noc``)."""

import sys

from noc.cli import main

sys.exit(main())
