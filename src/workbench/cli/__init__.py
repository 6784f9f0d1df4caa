"""The `workbench` command: one module per sub-command family, `main` in :mod:`workbench.cli.main`."""
