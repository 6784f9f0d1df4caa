"""``python -m workbench.jobs``: the jobs hub service (:mod:`workbench.jobs.service`)."""

import sys

from workbench.jobs.service import main

sys.exit(main())
