"""The test suite, a package: helpers import as ``tests.NAME`` and workers run as ``python -m tests.NAME``."""
