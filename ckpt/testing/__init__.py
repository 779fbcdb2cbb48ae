"""Conformance suites shipped with each plug point: every implementation, in this package or
outside it, runs the same tests (``storage``, ``sink``, ``restore_source``). They are pytest
classes: subclass one in a test module and implement its factory method."""
