import sys

from workbench.kubernetes.hub import main

sys.exit(main())
