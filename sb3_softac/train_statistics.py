"""The statistics of one ``train`` call: the rows both update paths produce, one host read, the non-finite report, the
logging.

Each gradient step reports its critic update as a row (:data:`CRITIC_COLUMNS`, then the non-finite flag as it stood
after that update; see ``SAC._nonfinite``), and each actor update (every ``policy_delay`` steps) its actor and
temperature update (:data:`ACTOR_COLUMNS`, without ``ent_coef_loss`` for a fixed temperature, then the flag). The
rows stay on the device until :meth:`TrainStatistics.read`, the call's one transfer to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch as th
from stable_baselines3.common.logger import Logger

CRITIC_COLUMNS = ("critic_loss", "ent_coef", "mean_q")
ACTOR_COLUMNS = ("actor_loss", "entropy", "ent_coef_loss")
# The order in which the logger receives the statistics (that of SB3's SAC, then ours).
_LOGGED = ("critic_loss", "actor_loss", "ent_coef_loss", "ent_coef", "entropy", "mean_q")
_LOSS_NAMES = {"critic_loss": "critic loss", "actor_loss": "actor loss", "ent_coef_loss": "entropy coefficient loss"}


def critic_row(loss: th.Tensor, ent_coef: th.Tensor, mean_q: th.Tensor, flag: th.Tensor) -> th.Tensor:
    """One gradient step's critic row, detached."""
    return th.stack([loss, ent_coef, mean_q, flag]).detach()


def actor_row(loss: th.Tensor, entropy: th.Tensor, ent_coef_loss: th.Tensor | None, flag: th.Tensor) -> th.Tensor:
    """One actor update's row, detached; ``ent_coef_loss`` is None for a fixed temperature."""
    middle = [] if ent_coef_loss is None else [ent_coef_loss]
    return th.stack([loss, entropy, *middle, flag]).detach()


@dataclass
class HostRows:
    """The rows of a call on the host: one per gradient step (``critic``) and one per actor update (``actor``)."""

    critic: np.ndarray
    actor: np.ndarray
    #: The gradient step (index in the call) of each actor row.
    actor_steps: list[int]

    def first_nonfinite(self) -> tuple[int, str] | None:
        """The gradient step (index in the call) where the flag was first set, and what was not finite; or None."""
        critic, actor = self.critic, self.actor
        # The flag never clears within a call: when the last rows are clear, every row is.
        if not (len(critic) > 0 and critic[-1, -1]) and not (len(actor) > 0 and actor[-1, -1]):
            return None
        critic_flagged = np.flatnonzero(critic[:, -1])
        actor_flagged = np.flatnonzero(actor[:, -1])
        # Within a step the critic update comes first: the flag stays set, so the first flagged row is the culprit.
        actor_first = self.actor_steps[actor_flagged[0]] if len(actor_flagged) > 0 else None
        if len(critic_flagged) > 0 and (actor_first is None or critic_flagged[0] <= actor_first):
            step = int(critic_flagged[0])
            checked = [("critic_loss", critic[step, 0])]
        else:
            assert actor_first is not None
            step = actor_first
            row = actor[actor_flagged[0]]
            # Checked in the order they were applied: the temperature's loss (when learned), then the actor's.
            checked = [("ent_coef_loss", row[2])] if len(row) > len(ACTOR_COLUMNS) else []
            checked.append(("actor_loss", row[0]))
        bad = [(name, value) for name, value in checked if not np.isfinite(value)]
        if bad:
            return step, f"the {_LOSS_NAMES[bad[0][0]]} is {bad[0][1]}"
        return step, f"a gradient of the {' or the '.join(_LOSS_NAMES[name] for name, _ in checked)} is not finite"

    def record(self, logger: Logger) -> None:
        """Log each statistic's mean over the call."""
        # The means of all columns at once, the flag's last: one numpy call per table.
        means: dict[str, float] = {}
        if len(self.critic) > 0:
            means.update(zip((*CRITIC_COLUMNS, "flag"), self.critic.mean(axis=0).tolist(), strict=True))
        if len(self.actor) > 0:
            columns = (*ACTOR_COLUMNS[: self.actor.shape[1] - 1], "flag")
            means.update(zip(columns, self.actor.mean(axis=0).tolist(), strict=True))
        for name in _LOGGED:
            if name in means:
                logger.record(f"train/{name}", means[name])


@dataclass
class TrainStatistics:
    """The rows of one ``train`` call, collected on the device."""

    #: Whether the temperature is learned: the actor rows then carry ``ent_coef_loss``.
    learned_temperature: bool
    critic: list[th.Tensor] = field(default_factory=list)
    actor: list[th.Tensor] = field(default_factory=list)
    actor_steps: list[int] = field(default_factory=list)

    def add(self, step: int, critic: th.Tensor, actor: th.Tensor | None) -> None:
        """The rows of gradient step ``step`` (index in the call); ``actor`` is None when the actor did not learn."""
        self.critic.append(critic)
        if actor is not None:
            self.actor.append(actor)
            self.actor_steps.append(step)

    def read(self) -> HostRows:
        """All rows on the host, in one transfer."""
        parts = [th.stack(rows).flatten() for rows in (self.critic, self.actor) if rows]
        host = th.cat(parts).cpu().numpy() if parts else np.empty(0, dtype=np.float32)
        critic_width = len(CRITIC_COLUMNS) + 1
        actor_width = len(ACTOR_COLUMNS) + (1 if self.learned_temperature else 0)
        critic = host[: len(self.critic) * critic_width].reshape(len(self.critic), critic_width)
        actor = host[critic.size :].reshape(len(self.actor), actor_width)
        return HostRows(critic, actor, self.actor_steps)
