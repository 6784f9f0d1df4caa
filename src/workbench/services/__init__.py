"""The hub services of the platform (quota, sessions, rosters) and their shared base (:mod:`.base`)."""
