"""The quota service: usage ledger, budgets, concurrency caps, reports and metrics.

- :mod:`.accounting` — pure: periods, usage clipped to periods, budget status, refusal messages
- :mod:`.ledger` — the usage ledger database (SQLite / PostgreSQL): events, reconcile, atomic admission
- :mod:`.app` — the JupyterHub service (``python -m workbench.services.quota``): REST API, OpenAPI, /metrics
- :mod:`.report` — ``workbench report``: usage per period as CSV, JSON or a PNG chart
- :mod:`.wiring` — how the embedded hub runs it (service, roles, custom scopes)
"""
