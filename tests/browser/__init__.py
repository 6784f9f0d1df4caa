"""Tests that drive a real browser (Debian's chromium through selenium) against a real embedded workbench."""
