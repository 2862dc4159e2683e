"""Shared fixtures live in tests/fixtures/, one module per area, registered here."""

pytest_plugins = [
    "tests.fixtures.tiny_models",
    "tests.fixtures.gemma",
    "tests.fixtures.servers",
]
