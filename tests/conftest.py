"""Fixtures, and one torch thread for every test (the suite runs on 2-core machines). Helpers are in ``envs.py``."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch as th
from envs import VectorBoxEnv

th.set_num_threads(1)


@pytest.fixture
def box_env() -> VectorBoxEnv:
    env = VectorBoxEnv()
    env.reset(seed=0)
    env.observation_space.seed(0)
    return env
