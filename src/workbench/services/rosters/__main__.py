import sys

from workbench.services.rosters.app import main

sys.exit(main())
