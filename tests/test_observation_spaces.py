"""Vector, image and Dict observations: ``check_env`` environments, ``CnnPolicy`` and ``MultiInputPolicy``."""

from typing import Any

import numpy as np
import pytest
from envs import ImageEnv, PointGoalEnv, VectorBoxEnv, make_sac
from gymnasium import spaces
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.vec_env import VecTransposeImage

import sb3_softac
from sb3_softac import SAC


@pytest.mark.parametrize("env_cls", [VectorBoxEnv, PointGoalEnv])
def test_check_env_passes_and_model_trains(env_cls) -> None:
    check_env(env_cls(), warn=False)
    env = env_cls()
    policy = "MultiInputPolicy" if isinstance(env.observation_space, spaces.Dict) else "MlpPolicy"
    model = make_sac(env, policy).learn(120)
    assert model.num_timesteps == 120
    assert model._n_updates == 70


def _image_env() -> ImageEnv:
    return ImageEnv(channels=3, action_space=spaces.Box(-1.0, 1.0, (2,), np.float32))


def _cnn_model(**policy_kwargs: Any) -> SAC:
    policy_kwargs = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16), **policy_kwargs)
    return make_sac(
        _image_env(), "CnnPolicy", buffer_size=200, learning_starts=20, batch_size=8, policy_kwargs=policy_kwargs
    )


@pytest.mark.parametrize("normalize_images", [True, False])
def test_policy_normalize_images(normalize_images) -> None:
    model = _cnn_model(normalize_images=normalize_images)
    assert model.actor.normalize_images is normalize_images
    assert model.critic.normalize_images is normalize_images
    seen: list[float] = []
    hook = model.actor.features_extractor.register_forward_pre_hook(lambda _, args: seen.append(args[0].max().item()))
    model.predict(np.full((36, 36, 3), 255, np.uint8), deterministic=True)
    hook.remove()
    assert seen == [1.0 if normalize_images else 255.0]


def test_cnn_policy_on_images() -> None:
    model = _cnn_model()
    assert isinstance(model.policy, sb3_softac.CnnPolicy)
    assert isinstance(model.get_env(), VecTransposeImage)
    assert isinstance(model.actor.features_extractor, NatureCNN)
    assert model.actor.features_extractor is not model.critic.features_extractor
    model.learn(60)
    assert model._n_updates == 40
    buffer = model.replay_buffer
    assert buffer.observations.dtype == np.uint8
    assert buffer.observations.shape[1:] == (1, 3, 36, 36)  # channel-first after VecTransposeImage
    action, _ = model.predict(_image_env().observation_space.sample(), deterministic=True)
    assert action.shape == (2,)
    assert np.all(np.abs(action) <= 1.0)


def test_multi_input_policy_on_dict_observations() -> None:
    model = make_sac(PointGoalEnv(), "MultiInputPolicy")
    assert isinstance(model.policy, sb3_softac.MultiInputPolicy)
    assert isinstance(model.actor.features_extractor, CombinedExtractor)
    model.learn(120)
    assert set(model.replay_buffer.observations) == {"position", "goal"}
    single, _ = model.predict({"position": np.array([0.5], np.float32), "goal": np.array([1.0], np.float32)})
    assert single.shape == (1,)
    batch = {"position": np.zeros((6, 1), np.float32), "goal": np.linspace(-2, 2, 6, dtype=np.float32)[:, None]}
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (6, 1)
    assert np.all(np.abs(actions) <= 2.0)
    assert len(np.unique(actions)) > 1  # the action depends on the goal
