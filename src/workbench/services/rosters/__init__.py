"""The rosters service: course rosters loaded by instructors and admins through the hub."""
