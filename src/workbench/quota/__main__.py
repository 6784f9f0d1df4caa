"""``python -m workbench.quota``: run the quota service (see workbench.quota.app)."""

from .app import main

raise SystemExit(main())
