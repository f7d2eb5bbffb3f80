"""Converting saved models between SB3's SAC and sb3_softac: weights, optimizer states, archives and policy files.

SB3 keeps one ``nn.Sequential`` per critic; sb3_softac one stacked ensemble. Everything else in an archive is
copied as is, and what sb3_softac has that SB3 lacks is derived from the two libraries' constructor signatures.
SB3 -> sb3_softac and sb3_softac -> SB3 are two separate pipelines over the helpers below.

This module knows SB3's layouts, not sb3_softac's classes: the callers pass those in (``policy_aliases``,
the algorithm class), which keeps the imports one-way (``sac``, ``policies`` and ``loading`` import it).
"""

import inspect
import io
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import stable_baselines3 as sb3
import torch as th
from gymnasium import spaces
from stable_baselines3.common.save_util import load_from_zip_file, save_to_zip_file
from stable_baselines3.sac import policies as sb3_policies

from sb3_softac import atomic_files

#: The modules that define each library's SAC policy classes.
SOFTAC_POLICIES = "sb3_softac.policies"
SB3_POLICIES = sb3_policies.__name__
#: The action spaces that SB3's SAC supports (its ``supported_action_spaces``).
SB3_ACTION_SPACES = (spaces.Box,)


def policy_class_named(name: str | None, policy_aliases: Mapping[str, type]) -> type | None:
    """sb3_softac's policy class of a name that either library gives its policies, or None.

    :param name: ``SACPolicy``, ``MlpPolicy``, ``CnnPolicy`` or ``MultiInputPolicy`` (the same in both libraries)
    :param policy_aliases: sb3_softac's policy classes by name (``SAC.policy_aliases``)
    """
    return policy_aliases.get("MlpPolicy" if name == "SACPolicy" else name or "")


# ---------------------------------------------------------------------------------------------------------------------
# Settings that only sb3_softac has


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls`` and their defaults, through its base classes (the subclass's win)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[name] = parameter.default
    return defaults


def softac_only_defaults(ours: type, theirs: type) -> dict[str, Any]:
    """Arguments of ``ours`` that SB3's ``theirs`` lacks, with the defaults that make ours behave as SB3's."""
    sb3_names = constructor_defaults(theirs).keys()
    return {
        name: value
        for name, value in constructor_defaults(ours).items()
        if name not in sb3_names and not name.startswith("_")
    }


# sb3_softac-only arguments that choose how the update is computed, not what it computes: with any value the model
# is SB3's SAC (they are dropped for SB3 like the others, never refused).
_IMPLEMENTATION_CHOICES = ("update_engine",)
# Attributes that SAC._setup_model derives from sb3_softac-only arguments (dropped with them).
_DERIVED_SOFTAC_ATTRIBUTES = ("qf_lr_schedule",)


# ---------------------------------------------------------------------------------------------------------------------
# Critic weights: SB3's per-critic layers and sb3_softac's stacked ensemble

# SB3 keeps one nn.Sequential per critic ("critic.qf1.2.weight", Linear weights stored (out, in)); we keep one
# stacked ensemble ("critic.q_networks.2.weight", stored (n_critics, in, out)). Layer indices coincide when the
# ensemble has neither dropout nor layer norm.
_MODULE = r"^(?P<module>(?:.+\.)?critic(?:_target)?)"
SB3_CRITIC_KEY = re.compile(_MODULE + r"\.qf(?P<member>\d+)\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")
OUR_CRITIC_KEY = re.compile(_MODULE + r"\.q_networks\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")


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


def state_dict_from_sb3(state: Mapping[str, th.Tensor], source: Any = "the state dict") -> dict[str, th.Tensor]:
    """Convert a state dict of an SB3 ``SACPolicy`` (or of its critics) to sb3_softac's layout.

    :param state: the SB3 state dict
    :param source: what holds it, for error messages
    :return: the same tensors, with every critic layer stacked into its ensemble layer, in SB3's key order
    :raises ValueError: when a critic lacks a layer that another critic has
    """
    layers: dict[str, dict[tuple[str, str], dict[int, th.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in state.items():
        if match := SB3_CRITIC_KEY.match(key):
            layers[match["module"]][match["layer"], match["kind"]][int(match["member"])] = value
    converted: dict[str, th.Tensor] = {}
    written: set[str] = set()
    for key, value in state.items():
        match = SB3_CRITIC_KEY.match(key)
        if match is None:
            converted[key] = value
            continue
        module = match["module"]
        if module in written:
            continue
        written.add(module)
        # The ensemble's layers go where SB3's first critic had them, in SB3's layer order, which is ours.
        n_critics = 1 + max(member for members in layers[module].values() for member in members)
        for (layer, kind), members in layers[module].items():
            absent = [f"{module}.qf{i}.{layer}.{kind}" for i in range(n_critics) if i not in members]
            if absent:
                raise ValueError(
                    f"{source} is incomplete: its SB3 critics have {n_critics} members, but {absent} is missing. "
                    "The weights were damaged or edited: use an earlier copy, or save the model again."
                )
            converted[f"{module}.q_networks.{layer}.{kind}"] = critic_tensor_from_sb3(
                kind, [members[i] for i in range(n_critics)]
            )
    return converted


def state_dict_to_sb3(state: Mapping[str, th.Tensor]) -> dict[str, th.Tensor]:
    """Convert a state dict of an sb3_softac ``SACPolicy`` to the layout of SB3's ``SACPolicy``.

    :param state: the sb3_softac state dict (its critics without dropout or layer norm)
    :return: the same tensors, with every ensemble layer split into one layer per critic
    """
    ensembles: dict[str, list[tuple[str, str, th.Tensor]]] = defaultdict(list)
    for key, value in state.items():
        if match := OUR_CRITIC_KEY.match(key):
            ensembles[match["module"]].append((match["layer"], match["kind"], value))
    converted: dict[str, th.Tensor] = {}
    written: set[str] = set()
    for key, value in state.items():
        match = OUR_CRITIC_KEY.match(key)
        if match is None:
            converted[key] = value
        elif match["module"] not in written:
            # The whole ensemble goes where its first layer stood, critic by critic and layer by layer within
            # each: the order in which SB3 registers its parameters, which its optimizer states follow.
            module = match["module"]
            written.add(module)
            members = {(layer, kind): critic_tensor_to_sb3(kind, tensor) for layer, kind, tensor in ensembles[module]}
            for member in range(value.shape[0]):
                for (layer, kind), tensors in members.items():
                    converted[f"{module}.qf{member}.{layer}.{kind}"] = tensors[member]
    return converted


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer states follow their parameters

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


def _reindex_optimizer_state(
    state: dict[str, Any],
    source_names: list[str],
    target_names: list[str],
    state_of: Callable[[str, dict[str, dict[str, Any]]], dict[str, Any] | None],
) -> dict[str, Any]:
    """Re-index an optimizer state dict from one parameter layout to another.

    :param state: the optimizer's state dict, indexed by position in ``source_names``
    :param source_names: parameter names of the source layout, in optimizer order
    :param target_names: parameter names of the target layout, in optimizer order
    :param state_of: ``(target name, {source name: per-parameter state}) -> per-parameter state`` (None: none yet)
    """
    by_name = {name: state["state"][index] for index, name in enumerate(source_names) if index in state["state"]}
    new_state = {}
    for index, name in enumerate(target_names):
        if (converted := state_of(name, by_name)) is not None:
            new_state[index] = converted
    groups = [dict(group, params=list(range(len(target_names)))) for group in state["param_groups"]]
    return {"state": new_state, "param_groups": groups}


def _stacked_member_states(name: str, by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The Adam state of our ensemble parameter ``name``, stacked from SB3's per-critic states."""
    match = OUR_CRITIC_KEY.match(name)
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


def _member_state(name: str, by_name: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The Adam state of SB3's per-critic parameter ``name``, sliced from our stacked state."""
    match = SB3_CRITIC_KEY.match(name)
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


def keep_built_implementation(optimizers: Iterable[th.optim.Optimizer]) -> None:
    """Give each optimizer back the fused implementation it was built with, after loading a state into it.

    ``load_state_dict`` takes every key of the saved param groups, ``fused`` included. An SB3 archive says None
    (SB3 builds plain Adam), which would switch our fused optimizers to the per-tensor loop: slower, and unable to
    take the non-finite guard's ``found_inf``. PyTorch records a fused build in ``_step_supports_amp_scaling``.

    :param optimizers: the loaded model's optimizers
    """
    for optimizer in optimizers:
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            for group in optimizer.param_groups:
                group.update(fused=True, foreach=None)  # fused and foreach exclude each other


# ---------------------------------------------------------------------------------------------------------------------
# Whole archives: SB3 -> sb3_softac, and sb3_softac -> SB3


@dataclass
class _Contents:
    data: dict[str, Any]
    params: dict[str, Any]  # state dicts by name (SB3 types them as tensors)
    pytorch_variables: Any

    @property
    def shared_extractor(self) -> bool:
        return bool((self.data.get("policy_kwargs") or {}).get("share_features_extractor", False))

    def convert_policy(
        self,
        convert: Callable[[dict[str, th.Tensor]], dict[str, th.Tensor]],
        state_of: Callable[[str, dict[str, dict[str, Any]]], dict[str, Any] | None],
    ) -> None:
        """Convert the policy's state dict to the other library's layout, and the critic optimizer's state with it.

        :param convert: the state dict conversion (:func:`state_dict_from_sb3` or :func:`state_dict_to_sb3`)
        :param state_of: the matching per-parameter optimizer state conversion (see :func:`_reindex_optimizer_state`)
        """
        source = self.params["policy"]
        self.params["policy"] = convert(source)
        if "critic.optimizer" in self.params:
            self.params["critic.optimizer"] = _reindex_optimizer_state(
                self.params["critic.optimizer"],
                _critic_optimizer_names(source, self.shared_extractor),
                _critic_optimizer_names(self.params["policy"], self.shared_extractor),
                state_of,
            )

    def write(self, destination: atomic_files.Destination) -> None:
        save_to_zip_file(destination, data=self.data, params=self.params, pytorch_variables=self.pytorch_variables)


def _read_contents(path: atomic_files.Destination, custom_objects: Mapping[str, Any] | None) -> _Contents:
    data, params, pytorch_variables = load_from_zip_file(path, custom_objects=dict(custom_objects or {}), device="cpu")
    assert data is not None  # read_archive checked that there is a 'data' member
    return _Contents(data, dict(params), pytorch_variables)


def sb3_archive_to_softac(
    path: atomic_files.Destination, policy_aliases: Mapping[str, type], custom_objects: Mapping[str, Any] | None = None
) -> tuple[io.BytesIO, dict[str, Any]]:
    """Convert an archive written by ``stable_baselines3.SAC.save`` into an sb3_softac archive, in memory.

    Weights, optimizer states, the entropy coefficient and the training state carry over unchanged. The
    archive's ``data`` is deserialised once, honouring ``custom_objects`` as SB3's loader does.

    :param path: the SB3 archive
    :param policy_aliases: sb3_softac's policy classes by name (``SAC.policy_aliases``)
    :param custom_objects: substitutes for entries of ``data``, which are then not unpickled
    :return: the converted archive, and its deserialised ``data`` (pass it as ``custom_objects`` when loading
        the converted archive, so that nothing is unpickled twice)
    """
    contents = _read_contents(path, custom_objects)
    contents.data["policy_class"] = _softac_policy_class(path, contents.data.get("policy_class"), policy_aliases)
    contents.convert_policy(
        lambda state: state_dict_from_sb3(state, source=f"{path} (policy.pth)"), _stacked_member_states
    )
    converted = io.BytesIO()
    contents.write(converted)
    converted.seek(0)
    return converted, contents.data


def _softac_policy_class(path: Any, saved: Any, policy_aliases: Mapping[str, type]) -> type:
    """sb3_softac's policy class for the class of an SB3 archive (kept when it already is one of ours)."""
    ours = policy_aliases["MlpPolicy"]
    if isinstance(saved, type) and issubclass(saved, ours):
        return saved
    named = policy_class_named(saved.__name__, policy_aliases) if isinstance(saved, type) else None
    if named is not None and saved.__module__ == sb3_policies.__name__:
        return named
    raise ValueError(
        f"{path} holds an SB3 SAC model with the policy class {saved!r}, which has no sb3_softac counterpart. Pass "
        f"custom_objects={{'policy_class': ...}} with a subclass of {ours.__module__}.{ours.__qualname__} that "
        "builds the same networks."
    )


def softac_archive_to_sb3(
    source: atomic_files.Destination, destination: atomic_files.Destination, algorithm: type
) -> None:
    """Write an sb3_softac archive as one that ``stable_baselines3.SAC.load`` reads, atomically.

    :param source: the sb3_softac archive
    :param destination: where to write the SB3 archive (named as ``save`` names it)
    :param algorithm: the sb3_softac algorithm class that wrote it (its defaults say what SB3 can represent)
    :raises ValueError: when the model uses an option that SB3's SAC does not have
    """
    contents = _read_contents(source, None)
    data = contents.data
    data["policy_class"] = check_sb3_can_represent(
        data["policy_class"], data.get("policy_kwargs") or {}, data.get("action_space"), algorithm, data
    )
    for name in [*softac_only_defaults(algorithm, sb3.SAC), *_DERIVED_SOFTAC_ATTRIBUTES]:
        data.pop(name, None)
    data["policy_kwargs"] = _sb3_policy_kwargs(data.get("policy_kwargs") or {}, data["policy_class"])
    contents.convert_policy(state_dict_to_sb3, _member_state)
    # Our optimizers default to fused Adam; hand SB3 the implementation choice it makes itself.
    for name in ("actor.optimizer", "critic.optimizer", "ent_coef_optimizer"):
        for group in contents.params.get(name, {}).get("param_groups", []):
            if group.get("fused"):
                group["fused"] = None
    atomic_files.write_atomically(destination, contents.write, suffix="zip")


def check_sb3_can_represent(
    policy_class: type,
    policy_kwargs: Mapping[str, Any],
    action_space: Any,
    algorithm: type | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> type:
    """Find SB3's policy class for ours, or raise a ``ValueError`` naming each sb3_softac-only option in use.

    :param policy_class: the sb3_softac policy class
    :param policy_kwargs: the policy's keyword arguments (or all its constructor parameters)
    :param action_space: the action space
    :param algorithm: the sb3_softac algorithm class, to check ``attributes`` against (None: a policy alone)
    :param attributes: the algorithm's saved attributes
    :return: SB3's policy class of the same name
    """
    sb3_class = getattr(sb3_policies, policy_class.__name__, None)
    ours = policy_class.__module__ == SOFTAC_POLICIES and sb3_class is not None
    problems = [] if ours else [f"the custom policy class {policy_class.__module__}.{policy_class.__qualname__}"]
    problems += [
        f"policy_kwargs {key}={policy_kwargs[key]!r}"
        for key, default in softac_only_defaults(policy_class, sb3_policies.SACPolicy).items()
        if policy_kwargs.get(key, default) != default
    ]
    if algorithm is not None and attributes is not None:
        problems += [
            f"{key}={attributes[key]!r}"
            for key, default in softac_only_defaults(algorithm, sb3.SAC).items()
            if key not in _IMPLEMENTATION_CHOICES and attributes.get(key, default) != default
        ]
    if not isinstance(action_space, SB3_ACTION_SPACES):
        problems.append(f"the {action_space} action space")
    if problems or sb3_class is None:
        raise ValueError(
            "This model cannot be written as a stable_baselines3.SAC checkpoint: SB3's SAC has no equivalent of "
            + ", ".join(problems)
            + ". Train with those options at their defaults (and sb3_softac's own policy classes) to exchange "
            "checkpoints with SB3."
        )
    return sb3_class


def _sb3_policy_kwargs(kwargs: Mapping[str, Any], sb3_policy_class: type) -> dict[str, Any]:
    """``kwargs`` without the arguments that SB3's policy does not take (checked to be at their defaults)."""
    return {key: value for key, value in kwargs.items() if key in _parameter_names(sb3_policy_class)}


def _parameter_names(cls: type) -> set[str]:
    return {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


# ---------------------------------------------------------------------------------------------------------------------
# Policy-only files (``policy.save`` / ``Policy.load``): ``torch.save({"state_dict": ..., "data": kwargs})``


def policy_file_for_sb3(policy: Any) -> dict[str, Any]:
    """What ``stable_baselines3.sac.policies.SACPolicy.load`` reads: SB3's constructor arguments and layout.

    :param policy: an sb3_softac ``SACPolicy``
    :raises ValueError: naming each option SB3's policy does not have
    """
    data = policy._get_constructor_parameters()
    sb3_class = check_sb3_can_represent(type(policy), data, data["action_space"])
    return {"state_dict": state_dict_to_sb3(policy.state_dict()), "data": _sb3_policy_kwargs(data, sb3_class)}
