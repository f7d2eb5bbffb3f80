"""Saved models: inspecting archives before loading them, and converting weights to and from SB3's SAC."""

import io
import json
import pathlib
import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch as th
from stable_baselines3.common.save_util import json_to_data, open_path


def read_saved_data(path: str | pathlib.Path | io.BufferedIOBase, keys: tuple[str, ...]) -> dict[str, Any]:
    """Read some entries of the ``data`` part of an SB3 model archive, without loading any weights.

    :param path: the archive, as ``BaseAlgorithm.load`` accepts it (the ``.zip`` suffix may be left out)
    :param keys: entries to read
    :return: the entries that the archive holds, deserialised
    """
    with open_path(path, "r", verbose=0, suffix="zip") as file:
        start = file.tell()
        try:
            with zipfile.ZipFile(file) as archive:
                data = json.loads(archive.read("data").decode())
        except (zipfile.BadZipFile, KeyError) as error:
            raise ValueError(f"{path} is not a model saved by Stable-Baselines3 (no zip with 'data').") from error
        finally:
            # A caller's stream must be readable again by the actual load.
            file.seek(start)
    return json_to_data(json.dumps({key: data[key] for key in keys if key in data}))


def check_is_softac_model(path: str | pathlib.Path | io.BufferedIOBase) -> None:
    """Raise a ``ValueError`` naming what the archive holds when it is not an sb3_softac SAC model.

    :param path: the archive
    """
    from sb3_softac.policies import SACPolicy

    policy_class = read_saved_data(path, ("policy_class",)).get("policy_class")
    if isinstance(policy_class, type) and issubclass(policy_class, SACPolicy):
        return
    if isinstance(policy_class, type):
        holds = f"a {policy_class.__module__}.{policy_class.__qualname__} policy"
    else:
        holds = "no readable policy class"
    raise ValueError(
        f"{path} is not an sb3_softac SAC model: it holds {holds}. "
        "Load it with the algorithm class that saved it (e.g. stable_baselines3.PPO.load)."
    )


# SB3 keeps one nn.Sequential per critic ("critic.qf1.2.weight", Linear weights stored (out, in)); we keep one
# stacked ensemble ("critic.q_networks.2.weight", stored (n_critics, in, out)). Layer indices coincide when the
# ensemble has neither dropout nor layer norm.
_MODULE = r"^(?P<module>(?:.+\.)?critic(?:_target)?)"
_SB3_CRITIC_KEY = re.compile(_MODULE + r"\.qf(?P<member>\d+)\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")
_OUR_CRITIC_KEY = re.compile(_MODULE + r"\.q_networks\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")


def critic_tensor_from_sb3(kind: str, members: list[th.Tensor]) -> th.Tensor:
    """Stack the per-critic tensors of one SB3 layer into our ensemble layout.

    Works for the weights themselves and for anything shaped like them (e.g. Adam's moments).

    :param kind: ``"weight"`` or ``"bias"``
    :param members: the tensor of each critic, in critic order (``(out, in)`` or ``(out,)``)
    :return: ``(n, in, out)`` or ``(n, 1, out)``
    """
    stacked = th.stack(members)
    return stacked.transpose(1, 2) if kind == "weight" else stacked.unsqueeze(1)


def critic_tensor_to_sb3(kind: str, stacked: th.Tensor) -> list[th.Tensor]:
    """Inverse of :func:`critic_tensor_from_sb3`."""
    if kind == "weight":
        return [member.t().contiguous() for member in stacked]
    return [member.squeeze(0).clone() for member in stacked]


def state_dict_from_sb3(state: Mapping[str, th.Tensor]) -> dict[str, th.Tensor]:
    """Convert a state dict of an SB3 ``SACPolicy`` (or of its critics) to sb3_softac's layout.

    :param state: the SB3 state dict
    :return: the same tensors, with every critic layer stacked into its ensemble layer
    """
    converted: dict[str, th.Tensor] = {}
    layers: dict[tuple[str, str, str], dict[int, th.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        match = _SB3_CRITIC_KEY.match(key)
        if match is None:
            converted[key] = value
        else:
            layers[match["module"], match["layer"], match["kind"]][int(match["member"])] = value
    for (module, layer, kind), members in layers.items():
        converted[f"{module}.q_networks.{layer}.{kind}"] = critic_tensor_from_sb3(
            kind, [members[i] for i in range(len(members))]
        )
    return converted


def state_dict_to_sb3(state: Mapping[str, th.Tensor]) -> dict[str, th.Tensor]:
    """Convert a state dict of an sb3_softac ``SACPolicy`` to the layout of SB3's ``SACPolicy``.

    :param state: the sb3_softac state dict (its critics without dropout or layer norm)
    :return: the same tensors, with every ensemble layer split into one layer per critic
    """
    converted: dict[str, th.Tensor] = {}
    for key, value in state.items():
        match = _OUR_CRITIC_KEY.match(key)
        if match is None:
            converted[key] = value
            continue
        for member, tensor in enumerate(critic_tensor_to_sb3(match["kind"], value)):
            converted[f"{match['module']}.qf{member}.{match['layer']}.{match['kind']}"] = tensor
    return converted
