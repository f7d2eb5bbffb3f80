"""Saving and loading models, replay buffers and parameters with SB3's methods, and what the archive holds."""

import io
import zipfile

import numpy as np
import pytest
import torch as th
from envs import VectorBoxEnv, box_observations, make_sac

from sb3_softac import SAC


def test_save_load_round_trip_and_continue_training(tmp_path, box_env) -> None:
    model = make_sac(box_env).learn(150)
    obs = box_observations(32)
    expected, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")

    loaded = SAC.load(tmp_path / "model.zip")
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], expected)
    for key, value in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[key], value), key
    assert loaded.num_timesteps == 150
    assert loaded._n_updates == model._n_updates

    env = VectorBoxEnv()
    loaded = SAC.load(tmp_path / "model.zip", env=env)
    assert loaded.get_env() is not None
    loaded.learn(60, reset_num_timesteps=False)
    assert loaded.num_timesteps == 210
    assert loaded._n_updates == model._n_updates + 60
    assert not np.array_equal(loaded.predict(obs, deterministic=True)[0], expected)


def test_load_from_a_byte_stream(box_env) -> None:
    """BaseAlgorithm.load accepts an open binary stream (e.g. io.BytesIO), and so must SAC.load."""
    model = make_sac(box_env)
    stream = io.BytesIO()
    model.save(stream)
    stream.seek(0)
    loaded = SAC.load(stream)
    obs = box_observations(8)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_replay_buffer_save_load_same_contents(tmp_path, box_env) -> None:
    model = make_sac(box_env, buffer_size=120).learn(150)
    buffer = model.replay_buffer
    assert buffer.full
    assert buffer.pos == 30
    model.save_replay_buffer(tmp_path / "buffer")

    other = make_sac(VectorBoxEnv(), buffer_size=120, seed=1)
    other.load_replay_buffer(tmp_path / "buffer")
    loaded = other.replay_buffer
    assert (loaded.pos, loaded.full, loaded.buffer_size) == (30, True, 120)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(buffer, name), err_msg=name)


def test_replay_buffer_loads_into_a_model_without_one(tmp_path, box_env) -> None:
    # SB3's HER tests delete the buffer attribute before loading one; SB3's SAC accepts that, so must we.
    model = make_sac(box_env, buffer_size=120).learn(150)
    saved_rewards = model.replay_buffer.rewards.copy()
    model.save_replay_buffer(tmp_path / "buffer")
    del model.replay_buffer
    model.load_replay_buffer(tmp_path / "buffer")
    np.testing.assert_array_equal(model.replay_buffer.rewards, saved_rewards)

    # A buffer that does not fit is refused, and the model is left without one, as it was.
    wrong = make_sac("MountainCarContinuous-v0", learning_starts=10).learn(20)
    wrong.save_replay_buffer(tmp_path / "wrong")
    del model.replay_buffer
    with pytest.raises(ValueError, match="observation shape"):
        model.load_replay_buffer(tmp_path / "wrong")
    assert model.replay_buffer is None


def test_get_set_parameters_round_trip(box_env) -> None:
    source = make_sac(box_env, seed=0).learn(100)
    target = make_sac(VectorBoxEnv(), seed=1)
    obs = box_observations(16)
    assert not np.allclose(source.predict(obs, deterministic=True)[0], target.predict(obs, deterministic=True)[0])

    parameters = source.get_parameters()
    assert {"policy", "actor.optimizer", "critic.optimizer"} <= parameters.keys()
    target.set_parameters(parameters, exact_match=True)
    np.testing.assert_array_equal(
        source.predict(obs, deterministic=True)[0], target.predict(obs, deterministic=True)[0]
    )
    for key, value in source.policy.state_dict().items():
        assert th.equal(target.policy.state_dict()[key], value), key


@pytest.mark.parametrize("ent_coef", ["auto", 0.05])
def test_saved_entropy_coefficient_restored_exactly(tmp_path, box_env, ent_coef) -> None:
    model = make_sac(box_env, ent_coef=ent_coef).learn(120)
    model.save(tmp_path / "model")
    loaded = SAC.load(tmp_path / "model", env=VectorBoxEnv())
    if ent_coef == "auto":
        assert model.log_ent_coef.item() != 0.0  # alpha moved away from its initial value 1
        assert th.equal(loaded.log_ent_coef.detach(), model.log_ent_coef.detach())
        assert loaded.log_ent_coef.requires_grad
        # the optimizer of the loaded model optimises the loaded tensor
        assert loaded.ent_coef_optimizer.param_groups[0]["params"][0] is loaded.log_ent_coef
        saved_state = model.ent_coef_optimizer.state_dict()["state"][0]
        loaded_state = loaded.ent_coef_optimizer.state_dict()["state"][0]
        assert th.equal(loaded_state["exp_avg"], saved_state["exp_avg"])
        before = loaded.log_ent_coef.detach().clone()
        loaded.learn(60, reset_num_timesteps=False)
        assert not th.equal(loaded.log_ent_coef.detach(), before)
    else:
        assert loaded.ent_coef_optimizer is None
        assert loaded.ent_coef_tensor.item() == pytest.approx(0.05)
        assert th.equal(loaded.ent_coef_tensor, model.ent_coef_tensor)


def test_saved_archive_holds_our_policy(tmp_path, box_env) -> None:
    make_sac(box_env).save(tmp_path / "model")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        names = set(archive.namelist())
    assert {"data", "policy.pth", "actor.optimizer.pth", "critic.optimizer.pth", "pytorch_variables.pth"} <= names
