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
from stable_baselines3.common.save_util import json_to_data, load_from_zip_file, open_path, save_to_zip_file
from stable_baselines3.sac import policies as sb3_policies


def read_saved_data(path: str | pathlib.Path | io.BufferedIOBase, keys: tuple[str, ...]) -> dict[str, Any]:
    """Read some entries of the ``data`` part of an SB3 model archive, without loading any weights.

    :param path: the archive, as ``BaseAlgorithm.load`` accepts it (the ``.zip`` suffix may be left out)
    :param keys: entries to read
    :return: the entries that the archive holds, deserialised
    """
    file = open_path(path, "r", verbose=0, suffix="zip")
    start = file.tell()
    try:
        with zipfile.ZipFile(file) as archive:
            data = json.loads(archive.read("data").decode())
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path} is not a model saved by Stable-Baselines3 (no zip with 'data').") from error
    finally:
        # A caller's stream stays open and rewound, for the actual load; only a file opened here is closed.
        file.seek(start)
        if not isinstance(path, io.BufferedIOBase):
            file.close()
    return json_to_data(json.dumps({key: data[key] for key in keys if key in data}))


def saved_policy_origin(path: str | pathlib.Path | io.BufferedIOBase) -> str:
    """Say whose SAC an archive holds: ``"sb3_softac"`` or ``"stable_baselines3"``.

    :param path: the archive
    :raises ValueError: naming what the archive holds when it is neither
    """
    from sb3_softac.policies import SACPolicy

    policy_class = read_saved_data(path, ("policy_class",)).get("policy_class")
    if isinstance(policy_class, type) and issubclass(policy_class, SACPolicy):
        return "sb3_softac"
    if isinstance(policy_class, type) and issubclass(policy_class, sb3_policies.SACPolicy):
        return "stable_baselines3"
    if isinstance(policy_class, type):
        holds = f"a {policy_class.__module__}.{policy_class.__qualname__} policy"
    else:
        holds = "no readable policy class"
    raise ValueError(
        f"{path} is not a SAC model: it holds {holds}. "
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
    ensembles: dict[str, list[tuple[re.Match[str], th.Tensor]]] = defaultdict(list)
    for key, value in state.items():
        if (match := _OUR_CRITIC_KEY.match(key)) is not None:
            ensembles[match["module"]].append((match, value))
    converted: dict[str, th.Tensor] = {}
    for key, value in state.items():
        match = _OUR_CRITIC_KEY.match(key)
        if match is None:
            converted[key] = value
        elif f"{match['module']}.qf0.{match['layer']}.{match['kind']}" not in converted:
            # SB3 registers its critics one after the other, so its parameter order (which optimizer
            # states follow) is critic by critic, layer by layer within each.
            layers = ensembles[match["module"]]
            for member in range(value.shape[0]):
                for layer, tensor in layers:
                    name = f"{layer['module']}.qf{member}.{layer['layer']}.{layer['kind']}"
                    converted[name] = critic_tensor_to_sb3(layer["kind"], tensor)[member]
    return converted


# Options that only sb3_softac has, with the values that make it behave as SB3's SAC.
_SOFTAC_ONLY_POLICY_KWARGS = {"dropout_rate": 0.0, "layer_norm": False}
_SOFTAC_ONLY_ATTRIBUTES = {"policy_delay": 1, "qf_learning_rate": None, "critic_subset_size": None}
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _critic_optimizer_names(policy_state: Mapping[str, th.Tensor], shared_extractor: bool) -> list[str]:
    """Names of the parameters in a critic optimizer, in its order: the critic's parameters (not its buffers),
    without the features extractor when the actor owns it."""
    return [
        key
        for key in policy_state
        if key.startswith("critic.")
        and not key.endswith(_BUFFER_NAMES)
        and not (shared_extractor and key.startswith("critic.features_extractor."))
    ]


def _convert_optimizer_state(
    state: dict[str, Any],
    source_names: list[str],
    target_names: list[str],
    convert_state: Any,
) -> dict[str, Any]:
    """Re-index an optimizer state dict from one parameter layout to another.

    :param state: the optimizer's state dict, indexed by position in ``source_names``
    :param source_names: parameter names of the source layout, in optimizer order
    :param target_names: parameter names of the target layout, in optimizer order
    :param convert_state: ``(target_name, {source_name: per-parameter state}) -> per-parameter state``
    """
    by_name = {name: state["state"][index] for index, name in enumerate(source_names) if index in state["state"]}
    new_state = {}
    for index, name in enumerate(target_names):
        converted = convert_state(name, by_name)
        if converted is not None:
            new_state[index] = converted
    groups = [dict(group, params=list(range(len(target_names)))) for group in state["param_groups"]]
    return {"state": new_state, "param_groups": groups}


def _merge_member_states(name: str, by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    match = _OUR_CRITIC_KEY.match(name)
    if match is None:
        return by_name.get(name)
    members: list[dict[str, Any]] = []
    while (key := f"{match['module']}.qf{len(members)}.{match['layer']}.{match['kind']}") in by_name:
        members.append(by_name[key])
    if not members:
        return None
    return {
        key: critic_tensor_from_sb3(match["kind"], [m[key] for m in members]) if key != "step" else value
        for key, value in members[0].items()
    }


def _split_member_state(name: str, by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    match = _SB3_CRITIC_KEY.match(name)
    if match is None:
        return by_name.get(name)
    stacked = by_name.get(f"{match['module']}.q_networks.{match['layer']}.{match['kind']}")
    if stacked is None:
        return None
    member = int(match["member"])
    return {
        key: critic_tensor_to_sb3(match["kind"], value)[member] if key != "step" else value
        for key, value in stacked.items()
    }


def _policy_class_named(name: str, module: Any) -> type:
    # SB3 and sb3_softac both expose SACPolicy (= MlpPolicy), CnnPolicy and MultiInputPolicy.
    return getattr(module, "SACPolicy" if name in ("SACPolicy", "MlpPolicy") else name)


def _convert_archive(
    path: str | pathlib.Path | io.BufferedIOBase, to_sb3: bool, device: th.device | str = "cpu"
) -> io.BytesIO:
    from sb3_softac import policies as softac_policies

    data, tensors, pytorch_variables = load_from_zip_file(path, device=device)
    if data is None:
        raise ValueError(f"{path} holds no model data to convert.")
    params: dict[str, Any] = dict(tensors)  # state dicts by name (SB3 types them as tensors)
    shared = bool(data.get("policy_kwargs", {}).get("share_features_extractor", False))
    source_state = params["policy"]
    if to_sb3:
        _check_sb3_can_represent(data)
        params["policy"] = state_dict_to_sb3(source_state)
        merge = _split_member_state
        data["policy_class"] = _policy_class_named(data["policy_class"].__name__, sb3_policies)
        for name in _SOFTAC_ONLY_ATTRIBUTES:
            data.pop(name, None)
        data.pop("qf_lr_schedule", None)
        data["policy_kwargs"] = {
            key: value for key, value in data.get("policy_kwargs", {}).items() if key not in _SOFTAC_ONLY_POLICY_KWARGS
        }
        # Our optimizers default to fused Adam; hand SB3 the implementation choice it makes itself.
        for name in ("actor.optimizer", "critic.optimizer", "ent_coef_optimizer"):
            for group in params.get(name, {}).get("param_groups", []):
                if group.get("fused"):
                    group["fused"] = None
    else:
        params["policy"] = state_dict_from_sb3(source_state)
        merge = _merge_member_states
        data["policy_class"] = _policy_class_named(data["policy_class"].__name__, softac_policies)
    if "critic.optimizer" in params:
        params["critic.optimizer"] = _convert_optimizer_state(
            params["critic.optimizer"],
            _critic_optimizer_names(source_state, shared),
            _critic_optimizer_names(params["policy"], shared),
            merge,
        )
    converted = io.BytesIO()
    save_to_zip_file(converted, data=data, params=params, pytorch_variables=pytorch_variables)
    converted.seek(0)
    return converted


def _check_sb3_can_represent(data: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming each sb3_softac-only option that the model uses."""
    from gymnasium import spaces

    problems = [
        f"policy_kwargs {key}={data['policy_kwargs'][key]!r}"
        for key, default in _SOFTAC_ONLY_POLICY_KWARGS.items()
        if data.get("policy_kwargs", {}).get(key, default) != default
    ]
    problems += [
        f"{key}={data[key]!r}" for key, default in _SOFTAC_ONLY_ATTRIBUTES.items() if data.get(key, default) != default
    ]
    if isinstance(data.get("action_space"), spaces.Discrete):
        problems.append(f"the {data['action_space']} action space")
    if problems:
        raise ValueError(
            "This model cannot be written as a stable_baselines3.SAC checkpoint: SB3's SAC has no equivalent of "
            + ", ".join(problems)
            + ". Train with those options at their defaults to exchange checkpoints with SB3."
        )


def sb3_archive_to_softac(path: str | pathlib.Path | io.BufferedIOBase) -> io.BytesIO:
    """Convert an archive written by ``stable_baselines3.SAC.save`` into an sb3_softac archive, in memory.

    Weights, optimizer states, the entropy coefficient and the training state carry over unchanged.

    :param path: the SB3 archive
    :return: the converted archive, ready for :meth:`sb3_softac.SAC.load`
    """
    return _convert_archive(path, to_sb3=False)


def softac_archive_to_sb3(
    source: str | pathlib.Path | io.BufferedIOBase, destination: str | pathlib.Path | io.BufferedIOBase
) -> None:
    """Write an sb3_softac archive as one that ``stable_baselines3.SAC.load`` reads.

    :param source: the sb3_softac archive
    :param destination: where to write the SB3 archive
    :raises ValueError: when the model uses an option that SB3's SAC does not have
    """
    converted = _convert_archive(source, to_sb3=True)
    # Named and created exactly as ``save`` does it (".zip" added only without a suffix, folders created).
    file = open_path(destination, "w", verbose=0, suffix="zip")
    try:
        file.write(converted.getvalue())
    finally:
        if not isinstance(destination, io.BufferedIOBase):
            file.close()
