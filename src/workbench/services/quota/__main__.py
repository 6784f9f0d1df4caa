"""``python -m workbench.services.quota``: run the quota service (see workbench.services.quota.app)."""

from workbench.services.quota.app import main

raise SystemExit(main())
