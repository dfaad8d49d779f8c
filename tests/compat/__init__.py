"""The compatibility matrix (a package: its conftest must not shadow tests/conftest.py under --doctest-modules)."""
