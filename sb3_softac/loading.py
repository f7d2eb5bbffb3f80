"""Reading model archives without trusting them, and refusing what cannot be loaded with an error that says why.

An SB3 archive is a zip with ``data`` (JSON; objects that JSON cannot hold are cloudpickled into it, with a
readable summary beside each pickle), one ``<name>.pth`` state dict per network or optimizer, and
``pytorch_variables.pth``. The checks here read the JSON and the weights (``torch.load(weights_only=True)``)
and unpickle nothing; the pickled entries are left to SB3's loader, which skips those given in
``custom_objects`` (:func:`weights_only_objects` gives it all of them). Policy-only files are pickles through
and through: :func:`read_policy_file` unpickles them, as SB3 does.
"""

import base64
import importlib
import io
import itertools
import json
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape
from stable_baselines3.common.save_util import open_path, recursive_getattr
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

from sb3_softac import atomic_files, sb3_conversion

#: Whose SAC an archive holds (see :func:`saved_policy_origin`).
SOFTAC = "sb3_softac"
SB3 = "stable_baselines3"

# ---------------------------------------------------------------------------------------------------------------------
# Loading a model


def load_model(
    cls: Any,
    load: Callable[..., Any],
    path: atomic_files.Destination,
    env: Any,
    custom_objects: dict[str, Any] | None,
    weights_only: bool,
    load_kwargs: dict[str, Any],
) -> Any:
    """``SAC.load``'s pipeline: read the archive untrusted, substitute or convert, load with SB3, check the result.

    An SB3 SAC archive is converted in memory (its deserialised data is handed on whole, so nothing is unpickled
    twice); with ``weights_only`` every pickled entry gets a substitute (:func:`weights_only_objects`); the loaded
    weights must be finite, and the optimizers keep the implementation they were built with.

    :param cls: the ``SAC`` class (or subclass) to load
    :param load: SB3's ``BaseAlgorithm.load`` bound to ``cls``
    :param path: the archive
    :param env: the environment given to ``load``, or None
    :param custom_objects: entries of the archive's data to use instead of unpickling them
    :param weights_only: unpickle nothing (see ``SAC.load``)
    :param load_kwargs: the other arguments of ``load`` (device, print_system_info, force_reset, settings)
    :return: the loaded model
    """
    archive = read_archive(path)
    objects = dict(custom_objects or {})
    origin = saved_policy_origin(archive)
    if weights_only:
        spaces_of_env = None
        if env is not None:
            env = cls._wrap_env(env, archive.data.get("verbose", 0))
            spaces_of_env = (env.observation_space, env.action_space)
        objects = weights_only_objects(archive, cls.policy_aliases, spaces_of_env, objects)
    if origin == SB3:
        path, objects = sb3_conversion.sb3_archive_to_softac(path, cls.policy_aliases, objects)
    else:
        load_kwargs = {**legacy_settings(archive, load_kwargs), **load_kwargs}
    model = load(path, env=env, custom_objects=objects or None, **load_kwargs)
    state_dicts, variables = model._get_torch_save_params()
    check_finite(
        {**model.get_parameters(), "pytorch_variables": {name: getattr(model, name) for name in variables}},
        archive.source,
    )
    optimizers = (recursive_getattr(model, name) for name in state_dicts)
    sb3_conversion.keep_built_implementation(opt for opt in optimizers if isinstance(opt, th.optim.Optimizer))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Reading an archive


@dataclass(frozen=True)
class Archive:
    """What a model archive holds, read without unpickling anything."""

    #: the path or stream, as given (for messages)
    source: Any
    #: the ``data`` entry as plain JSON: pickled objects are still ``{":type:", ":serialized:", ...}`` dicts
    data: dict[str, Any]
    #: the names of the archive's members
    members: frozenset[str]

    def read_member(self, name: str) -> bytes:
        """The bytes of one member, e.g. ``"policy.pth"``."""
        file = open_path(self.source, "r", verbose=0, suffix="zip")
        start = file.tell()
        try:
            with zipfile.ZipFile(file) as archive:
                return archive.read(name)
        finally:
            _release(self.source, file, start)


def _release(source: Any, file: Any, start: int) -> None:
    # A caller's stream stays open and rewound, for the actual load; only a file opened here is closed.
    file.seek(start)
    if not isinstance(source, io.BufferedIOBase):
        file.close()


_DAMAGED = "use an earlier copy, or save the model again (a save that was interrupted, or a copy cut short, does this)"


_LOCAL_HEADER_SIZE = 30


def _first_member_name(head: bytes) -> str | None:
    """The name in a zip's first local file header (the bytes a zip starts with); None when ``head`` is no zip."""
    if len(head) < _LOCAL_HEADER_SIZE or head[:4] != b"PK\x03\x04":
        return None
    name_length = int.from_bytes(head[26:28], "little")
    return head[_LOCAL_HEADER_SIZE : _LOCAL_HEADER_SIZE + name_length].decode("utf-8", "replace")


def read_archive(path: atomic_files.Destination) -> Archive:
    """Open a model archive and check that it is whole, before anything is unpickled or built.

    :param path: the archive, as ``BaseAlgorithm.load`` accepts it (the ``.zip`` suffix may be left out)
    :raises ValueError: naming the file and what is wrong: not a zip, a damaged or truncated zip, no ``data``,
        ``data`` that is not JSON, or no ``policy.pth``
    """
    file = open_path(path, "r", verbose=0, suffix="zip")
    start = file.tell()
    try:
        first_member = _first_member_name(file.read(_LOCAL_HEADER_SIZE + 64))
        file.seek(start)
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()  # reads every member and checks its CRC
                members = frozenset(archive.namelist())
                raw = archive.read("data") if "data" in members else None
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            if first_member is not None:
                raise ValueError(f"{path} is a damaged or truncated zip archive ({error}): {_DAMAGED}.") from error
            raise ValueError(f"{path} is not a model saved by Stable-Baselines3 (no zip with 'data').") from error
    finally:
        _release(path, file, start)
    if damaged is not None:
        raise ValueError(f"{path} is damaged: its member {damaged!r} fails its checksum; {_DAMAGED}.")
    if raw is None and first_member == "data":
        # SB3 writes 'data' first. A cut archive can still open, through a weights file's own zip (torch.save
        # writes zips, stored uncompressed inside), which then hides the members before it.
        raise ValueError(
            f"{path} is a truncated model archive (its end, with the zip's table of contents, is missing): {_DAMAGED}."
        )
    if raw is None:
        raise ValueError(f"{path} is not a model saved by Stable-Baselines3 (no zip with 'data').")
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: its 'data' member (the model's settings) is not valid JSON ({error}). The archive was damaged "
            f"or edited by hand; {_DAMAGED}."
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: its 'data' member is JSON but not an object of settings; {_DAMAGED}.")
    if "policy.pth" not in members:
        raise ValueError(
            f"{path} holds no 'policy.pth', the network weights (it holds {sorted(members)}): the archive is "
            "incomplete. Load the complete archive that save() wrote."
        )
    return Archive(path, data, members)


# ---------------------------------------------------------------------------------------------------------------------
# Classes named in the JSON, and whose SAC an archive holds

# SB3 writes, beside each pickled class, the JSON-readable entries of its ``__dict__``: ``__module__`` as is and its
# methods as ``str(function)``, "<function SACPolicy.__init__ at 0x...>", whose qualified name names the class.
_METHOD_REPR = re.compile(r"^<function (?P<owner>[\w.<>]+)\.\w+ at 0x[0-9a-f]+>$")
_CLASS_REPR = re.compile(r"^<class '(?P<module>[\w.]+)\.(?P<name>\w+)'>$")
# Packages whose classes may be looked up by the name written in a file (importing them runs no code from the file).
_TRUSTED_MODULES = ("torch.nn", "torch.optim", "stable_baselines3", "sb3_softac")


@dataclass(frozen=True)
class SavedClass:
    """A class pickled into ``data``, as named by its readable summary."""

    module: str
    #: the class name, or None when the summary lists no method defined in the class itself
    name: str | None

    def __str__(self) -> str:
        return f"{self.module}.{self.name}" if self.name else f"a class from {self.module}"


def saved_class(entry: Any) -> SavedClass | None:
    """Read which class a pickled JSON entry holds, without unpickling it; None when it is no pickled class."""
    if not (isinstance(entry, dict) and ":serialized:" in entry and isinstance(entry.get("__module__"), str)):
        return None
    owners = {
        match["owner"] for value in entry.values() if isinstance(value, str) and (match := _METHOD_REPR.match(value))
    }
    name = owners.pop().rsplit(".", 1)[-1] if len(owners) == 1 else None
    return SavedClass(entry["__module__"], name)


def _trusted_class(module: str, name: str | None) -> type | None:
    """The class ``module.name`` if it lives in one of :data:`_TRUSTED_MODULES`, else None."""
    if name is None or not any(module == root or module.startswith(root + ".") for root in _TRUSTED_MODULES):
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _algorithm_named_by(policy_module: str) -> str | None:
    """The algorithm class that saves policies of ``policy_module``: ``stable_baselines3.td3.policies`` gives
    ``stable_baselines3.TD3``, ``sb3_contrib.tqc.policies`` gives ``sb3_contrib.TQC``; None when no algorithm
    package of that name exists (e.g. ``stable_baselines3.common.policies``, shared by PPO and A2C)."""
    parts = policy_module.split(".")
    if len(parts) != 3 or parts[0] not in (SB3, "sb3_contrib") or parts[2] != "policies":
        return None
    try:
        package = importlib.import_module(parts[0])
    except ImportError:
        return None
    for attribute in dir(package):
        if attribute.lower() == parts[1] and isinstance(getattr(package, attribute), type):
            return f"{parts[0]}.{attribute}"
    return None


def _not_sac(source: Any, holds: str, module: str) -> ValueError:
    algorithm = _algorithm_named_by(module)
    hint = f"{algorithm}.load" if algorithm else "the load method of the algorithm class that saved it"
    return ValueError(f"{source} is not a SAC model: it holds {holds}. Load it with {hint}.")


def saved_policy_origin(archive: Archive) -> str:
    """Say whose SAC an archive holds, :data:`SOFTAC` or :data:`SB3`, without unpickling anything.

    The policy class's module, readable in the JSON, decides. A class from elsewhere (a user's subclass) is
    judged by the layout of the critic weights, read with ``torch.load(weights_only=True)``.

    :param archive: the archive, from :func:`read_archive`
    :raises ValueError: naming what the archive holds, and the class that loads it, when it is no SAC model
    """
    saved = saved_class(archive.data.get("policy_class"))
    if saved is not None and saved.module == sb3_conversion.SOFTAC_POLICIES:
        return SOFTAC
    if saved is not None and saved.module == sb3_conversion.SB3_POLICIES:
        return SB3
    if saved is not None and saved.module.split(".")[0] in (SB3, "sb3_contrib"):
        raise _not_sac(archive.source, f"a {saved} policy", saved.module)
    keys = th.load(io.BytesIO(archive.read_member("policy.pth")), map_location="cpu", weights_only=True).keys()
    if any(sb3_conversion.OUR_CRITIC_KEY.match(key) for key in keys):
        return SOFTAC
    if any(sb3_conversion.SB3_CRITIC_KEY.match(key) for key in keys):
        return SB3
    holds = f"a {saved} policy" if saved is not None else "no readable policy class"
    raise _not_sac(archive.source, f"{holds} without SAC critics", saved.module if saved else "")


# ---------------------------------------------------------------------------------------------------------------------
# Loading with weights_only=True: a substitute for every pickled entry

# Entries that a load rebuilds (``_setup_model`` recomputes them from the readable settings) or that a fresh model
# starts without (the rollout in progress and the episode statistics; ``learn`` resets the environment and
# starts new windows, as ``load(env=...)`` with ``force_reset=True`` does for the observation anyway).
_REBUILT_ON_LOAD = ("lr_schedule", "qf_lr_schedule", "batch_norm_stats", "batch_norm_stats_target")
_RUN_STATE = ("_last_obs", "_last_original_obs", "_last_episode_starts", "ep_info_buffer", "ep_success_buffer")


def weights_only_objects(
    archive: Archive,
    policy_aliases: Mapping[str, type],
    env_spaces: tuple[spaces.Space, spaces.Space] | None,
    custom_objects: Mapping[str, Any],
) -> dict[str, Any]:
    """``custom_objects`` that leave SB3's loader nothing to unpickle.

    Each pickled entry of ``data`` gets a substitute: the user's (``custom_objects``), the spaces of the
    environment, sb3_softac's policy class of the saved class's name, classes and settings read from the JSON
    summary (policy kwargs, the replay buffer class, ``train_freq``), or the value a fresh model starts with for
    what a load rebuilds anyway.

    :param archive: the archive
    :param policy_aliases: sb3_softac's policy classes by name (``SAC.policy_aliases``)
    :param env_spaces: observation and action spaces of the environment given to ``load``, if any
    :param custom_objects: the user's substitutes; they take precedence
    :raises ValueError: listing every entry that has no substitute, and what to pass for it
    """
    objects = dict(custom_objects)
    missing: list[str] = []
    for key, entry in archive.data.items():
        if key in objects or not (isinstance(entry, dict) and ":serialized:" in entry):
            continue
        if key in ("observation_space", "action_space"):
            if env_spaces is None:
                missing.append(key)
            else:
                objects[key] = env_spaces[1] if key == "action_space" else env_spaces[0]
                _check_space_matches(archive.source, key, entry, objects[key])
            continue
        substitute = _readable_substitute(key, entry, policy_aliases)
        if substitute is _UNREADABLE:
            missing.append(key)
        else:
            objects[key] = substitute
    if missing:
        needs_env = [key for key in missing if key.endswith("_space")]
        others = [key for key in missing if key not in needs_env]
        asks = (["env (its spaces replace the pickled ones)"] if needs_env else []) + (
            [f"custom_objects with {others} (each a value to use in place of the file's)"] if others else []
        )
        raise ValueError(
            f"{archive.source}: weights_only=True unpickles nothing, and these entries of the archive are pickled: "
            f"{missing}. Pass " + " and ".join(asks) + ", or load without weights_only if you trust the file."
        )
    return objects


_UNREADABLE = object()


def _readable_substitute(key: str, entry: dict[str, Any], policy_aliases: Mapping[str, type]) -> Any:
    """A substitute for the pickled entry ``key`` built from its readable summary, or :data:`_UNREADABLE`."""
    if key in _REBUILT_ON_LOAD or key in _RUN_STATE:
        return None
    if key == "policy_class":
        saved = saved_class(entry)
        if saved is None or saved.module not in (sb3_conversion.SOFTAC_POLICIES, sb3_conversion.SB3_POLICIES):
            return _UNREADABLE
        return sb3_conversion.policy_class_named(saved.name, policy_aliases) or _UNREADABLE
    if key == "replay_buffer_class":
        saved = saved_class(entry)
        return (saved and _trusted_class(saved.module, saved.name)) or _UNREADABLE
    if key == "train_freq":
        return _read_train_freq(entry[":serialized:"])
    if key == "policy_kwargs" and entry.get(":type:") == "<class 'dict'>":
        kwargs = {name: value for name, value in entry.items() if not name.startswith(":")}
        for name, value in kwargs.items():
            if isinstance(value, str):  # a value JSON could not hold, written as str(value): only classes are read
                match = _CLASS_REPR.match(value)
                kwargs[name] = _trusted_class(match["module"], match["name"]) if match else None
                if kwargs[name] is None:
                    return _UNREADABLE
        return kwargs
    return _UNREADABLE


def _read_train_freq(serialized: str) -> Any:
    """Read a pickled ``TrainFreq`` without unpickling it.

    The pickle is parsed (not run) for its numbers and unit names; the candidate ``TrainFreq`` whose own
    pickle is byte for byte the saved one is the saved value.
    """
    try:
        payload = base64.b64decode(serialized.encode(), validate=True)
        arguments = [argument for _, argument, _ in pickletools.genops(payload)]
    except Exception:  # any parse failure: the payload is not what this reader knows
        return _UNREADABLE
    numbers = {argument for argument in arguments if isinstance(argument, int) and not isinstance(argument, bool)}
    for frequency, unit in itertools.product(sorted(numbers), TrainFrequencyUnit):
        candidate = TrainFreq(frequency, unit)
        if cloudpickle.dumps(candidate) == payload:
            return candidate
    return _UNREADABLE


def _check_space_matches(source: Any, key: str, entry: dict[str, Any], space: spaces.Space) -> None:
    """Refuse an environment whose space has another type or shape than the saved one (both readable)."""
    saved_type = entry.get(":type:")
    saved_shape = entry.get("_shape")
    if saved_type != str(type(space)) or (saved_shape is not None and tuple(saved_shape) != space.shape):
        raise ValueError(
            f"{source} was saved for an {key} {saved_type} of shape {saved_shape}, but the env given has {space}. "
            "Pass the environment the model was trained on."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Archives from older versions of sb3_softac


def legacy_settings(archive: Archive, given: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that an archive from an older sb3_softac implied without saving them, with a warning for each.

    Before ``actor_q_reduction`` existed, ``critic_subset_size`` also made the actor maximise the mean of the
    critics (REDQ). Such an archive loads with ``actor_q_reduction="mean"``, its behaviour when saved.

    :param archive: an sb3_softac archive
    :param given: the keyword arguments given to ``load``, which take precedence (and silence the warning)
    :return: keyword arguments for ``load``
    """
    data = archive.data
    if data.get("critic_subset_size") is None or "actor_q_reduction" in data or "actor_q_reduction" in given:
        return {}
    warnings.warn(
        f"{archive.source} was saved before actor_q_reduction existed, when critic_subset_size="
        f"{data['critic_subset_size']} also made the actor maximise the mean of the critics. It loads with "
        "actor_q_reduction='mean' to keep that behaviour. Pass actor_q_reduction='min' to load() for SAC's minimum "
        "instead; saving the model again records the choice.",
        UserWarning,
        stacklevel=4,
    )
    return {"actor_q_reduction": "mean"}


# ---------------------------------------------------------------------------------------------------------------------
# Policy-only files


def read_policy_file(
    path: atomic_files.Destination, device: th.device | str
) -> tuple[dict[str, Any], dict[str, th.Tensor]]:
    """The constructor arguments and the state dict (in sb3_softac's layout) of a policy file of either library.

    The file is unpickled (``torch.load(weights_only=False)``, as SB3's ``BaseModel.load`` does).

    :param path: the file written by ``policy.save``
    :param device: where to put the tensors
    :raises ValueError: when the file is no policy file, or holds NaN or inf weights
    """
    not_a_policy = (
        f"{path} is not a policy file written by policy.save() (a torch file of a dict with 'state_dict' and 'data')."
        " For a whole model archive (.zip), use SAC.load."
    )
    try:
        saved = th.load(path, map_location=device, weights_only=False)  # type: ignore[arg-type]
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{not_a_policy} ({error})") from error
    if not (isinstance(saved, Mapping) and isinstance(saved.get("data"), dict) and "state_dict" in saved):
        raise ValueError(not_a_policy)
    state = saved["state_dict"]
    if any(sb3_conversion.SB3_CRITIC_KEY.match(key) for key in state):
        state = sb3_conversion.state_dict_from_sb3(state, source=path)
    check_finite({"state_dict": state}, path)
    return dict(saved["data"]), state


# ---------------------------------------------------------------------------------------------------------------------
# Finite weights


def _tensors(value: Any, name: str) -> Iterator[tuple[str, th.Tensor]]:
    """Every tensor in a (nested) state dict, with a readable path."""
    if isinstance(value, th.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{name}[{key!r}]" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def check_finite(state_dicts: Mapping[str, Any], source: Any) -> None:
    """Refuse weights that hold NaN or inf, naming the first such tensor.

    :param state_dicts: state dicts and variables by the name of their file in the archive (``"policy"``, ...)
    :param source: the archive, for the message
    :raises ValueError: naming the file, the tensor and how many of its entries are not finite
    """
    for file_name, state in state_dicts.items():
        for name, tensor in _tensors(state, ""):
            if tensor.is_floating_point() and not (finite := th.isfinite(tensor)).all():
                raise ValueError(
                    f"{source} holds non-finite weights: {name} in {file_name}.pth has {int((~finite).sum())} NaN or "
                    f"inf entries (of {tensor.numel()}). The model diverged before it was saved and would act on NaN: "
                    "load an earlier checkpoint."
                )


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffers


def check_replay_buffer_fits(buffer: Any, model: Any, source: Any) -> None:
    """Refuse a replay buffer whose transitions do not fit the model's environment.

    :param buffer: the loaded replay buffer
    :param model: the algorithm it is for (its observation and action spaces and number of environments)
    :param source: the file, for the message
    :raises ValueError: naming what differs
    """
    expected = {
        "observation shape": get_obs_shape(model.observation_space),
        "action dimension": get_action_dim(model.action_space),
        "number of environments": model.n_envs,
    }
    found = {
        "observation shape": getattr(buffer, "obs_shape", None),
        "action dimension": getattr(buffer, "action_dim", None),
        "number of environments": getattr(buffer, "n_envs", None),
    }
    different = [f"{key} {found[key]} (the model's: {value})" for key, value in expected.items() if found[key] != value]
    if different:
        raise ValueError(
            f"{source} holds a replay buffer that does not fit this model: its " + ", ".join(different) + ". It was "
            "saved from another environment (or another number of parallel environments). Load the buffer saved with "
            "this model, or train without one."
        )
