"""Notebook servers: what every engine needs to start one (profile choice, spawn form, admission, clusters that
stop with the server: :mod:`workbench.spawn.common`) and the thin engines over it (local processes, Kubernetes pods)."""
