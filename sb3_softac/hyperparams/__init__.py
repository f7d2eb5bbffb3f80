"""
The RL Zoo hyperparameter files shipped with sb3_softac, as package data: ``softac.yml`` (read by
``sb3-softac-zoo train --algo softac``), ``softac_droq.yml`` and ``softac_redq.yml``.

This module only locates them, without importing rl_zoo3, so that scripts such as the benchmarks can read them too.
"""

from pathlib import Path

#: Folder of the packaged hyperparameter files.
HYPERPARAMS_DIR = Path(__file__).parent
