"""What differs between the supported releases of Stable-Baselines3, in one place.

stable-baselines3 2.7 added n-step returns to the off-policy algorithms (``n_steps``, ``NStepReplayBuffer`` and the
``discounts`` field of ``ReplayBufferSamples``) and the ``FloatSchedule`` class. On 2.6 the SAC here trains with
one-step returns only, as SB3's own SAC 2.6 does, and a learning-rate schedule is the plain function 2.6 makes.
"""

import inspect
from typing import Any

import stable_baselines3 as sb3
import torch as th
from stable_baselines3.common import utils as sb3_utils
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.type_aliases import ReplayBufferSamples, Schedule

#: Whether this SB3 has n-step returns (2.7 and newer).
HAS_N_STEPS = "n_steps" in inspect.signature(OffPolicyAlgorithm.__init__).parameters


def n_steps_kwargs(n_steps: int) -> dict[str, Any]:
    """The ``n_steps`` keyword for ``OffPolicyAlgorithm.__init__``: none on an SB3 without n-step returns.

    :raises ValueError: for ``n_steps > 1`` on an SB3 without n-step returns
    """
    if HAS_N_STEPS:
        return {"n_steps": n_steps}
    if n_steps != 1:
        raise ValueError(
            f"n_steps={n_steps} needs stable-baselines3 >= 2.7, which added n-step returns; this is "
            f"stable-baselines3 {sb3.__version__}. Upgrade it (pip install 'stable-baselines3>=2.7') or use n_steps=1."
        )
    return {}


def float_schedule(value: float | Schedule) -> Schedule:
    """SB3's schedule of a constant or a callable, as its own algorithms make it (``FloatSchedule`` from 2.7 on)."""
    schedule_class = getattr(sb3_utils, "FloatSchedule", None)
    if schedule_class is not None:
        return schedule_class(value)
    return sb3_utils.get_schedule_fn(value)


def discounts(samples: ReplayBufferSamples, gamma: float) -> th.Tensor | float:
    """The per-sample ``gamma^n`` of an n-step minibatch, or ``gamma`` (one-step returns, or an SB3 without them)."""
    value: th.Tensor | None = getattr(samples, "discounts", None)
    return gamma if value is None else value


def sample_rows(samples: ReplayBufferSamples, rows: slice) -> ReplayBufferSamples:
    """The given rows of every field of a minibatch, whatever fields this SB3's ``ReplayBufferSamples`` has."""
    fields: list[Any] = [None if field is None else field[rows] for field in samples]
    return type(samples)(*fields)
