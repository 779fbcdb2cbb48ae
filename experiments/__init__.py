"""Experiments that go with the library: scripts, not part of the installed package."""
