"""Notebook jobs: a notebook run as a batch job of the user's own account, admitted and charged by the quota service.

- :mod:`workbench.jobs.model` — pure parts: parameters, time limits against the group's, job records, sbatch script;
- :mod:`workbench.jobs.execute` — what runs inside the job, as the user: parameters injected, nbclient, results;
- :mod:`workbench.jobs.engines` — Slurm (sbatch as the user) and local processes (the embedded engine);
- :mod:`workbench.jobs.store` — the service's job table (SQLite in the state folder);
- :mod:`workbench.jobs.service` — the hub service ``jobs`` (``python -m workbench.jobs``);
- :mod:`workbench.jobs.wiring` — how the embedded hub runs it (service, roles, scopes);
- :mod:`workbench.jobs.schedules` — job definitions with cron schedules, run by the service when due;
- :mod:`workbench.jobs.scheduler` — JupyterLab's "Create Notebook Job" (jupyter-scheduler) on the service.
"""
