"""Shared fixtures: a fresh registry per test that changes plugin configuration."""

import numpy as np
import pytest

from quantfmt import plugins


@pytest.fixture
def fresh_registry():
    """Reset plugin configuration before and after a test that calls plugins.configure()."""
    plugins.configure()
    yield plugins
    plugins.configure()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
