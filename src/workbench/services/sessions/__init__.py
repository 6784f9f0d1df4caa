"""The sessions service: session limits with warnings, per-profile idle and GPU-idle culling.

Pure rules in :mod:`.rules`; the service (hub client, HTTP handlers, periodic rounds) in :mod:`.app`."""
