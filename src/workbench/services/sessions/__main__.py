import sys

from workbench.services.sessions.app import main

sys.exit(main())
