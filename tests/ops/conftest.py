"""A fresh seed per attention test: every run draws new inputs."""

import numpy as np
import pytest


@pytest.fixture(name="seed")
def fixture_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2 ** 31))
