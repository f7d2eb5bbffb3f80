"""sb3_softac: a fast, from-scratch Soft Actor-Critic for the Stable-Baselines3 ecosystem."""

from sb3_softac.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_softac.sac import SAC

__version__ = "0.1.0"

__all__ = ["SAC", "CnnPolicy", "MlpPolicy", "MultiInputPolicy", "__version__"]
