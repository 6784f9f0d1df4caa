"""Dask Gateway: cluster options and limits (:mod:`.options`), admission and accounting for every backend
(:mod:`.quota`), the backends (local, Slurm, Kubernetes) and the dashboard guard."""
