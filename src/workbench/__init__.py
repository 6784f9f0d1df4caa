"""Workbench: JupyterHub, Dask Gateway and budgets for a research computing centre, from one policy."""

__version__ = "0.1.0"
