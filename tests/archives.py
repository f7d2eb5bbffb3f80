"""Test helpers that take model archives apart: edit their members, plant payloads, train tiny models to save."""

import base64
import json
import pathlib
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
from envs import make_sac

NET = [16]


def tiny_model(algo: type, env_id: str = "Pendulum-v1", steps: int = 40, **kwargs: Any) -> Any:
    """A model of ``algo`` (made by :func:`envs.make_sac`) trained for a few steps, so that optimizer states exist."""
    kwargs.setdefault("policy_kwargs", dict(net_arch=NET))
    kwargs = dict(dict(learning_starts=20, batch_size=16, buffer_size=200), **kwargs)
    return make_sac(gym.make(env_id), algo=algo, **kwargs).learn(steps)


def observations(env_id: str = "Pendulum-v1", n: int = 16) -> np.ndarray:
    space = gym.make(env_id).observation_space
    space.seed(3)
    return np.stack([space.sample() for _ in range(n)])


def actions(model: Any, obs: np.ndarray) -> np.ndarray:
    return model.predict(obs, deterministic=True)[0]


def rewrite_archive(
    source: pathlib.Path,
    destination: pathlib.Path,
    edit_data: Callable[[dict[str, Any]], None] | None = None,
    replace: dict[str, bytes] | None = None,
    drop: Iterable[str] = (),
    raw_data: bytes | None = None,
) -> None:
    """Copy an archive member by member, editing its ``data`` JSON, replacing or dropping members."""
    replace = replace or {}
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        for name in original.namelist():
            if name in drop:
                continue
            content = replace.get(name, original.read(name))
            if name == "data" and raw_data is not None:
                content = raw_data
            elif name == "data" and edit_data is not None:
                data = json.loads(content)
                edit_data(data)
                content = json.dumps(data).encode()
            copy.writestr(name, content)


class WriteMarker:
    """Unpickling this object creates the file ``path``: a stand-in for code hidden in a file."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def plant_payloads(data: dict[str, Any], folder: pathlib.Path, keys: Iterable[str] | None = None) -> list[pathlib.Path]:
    """Replace the pickle of each pickled entry of ``data`` (or of ``keys``) by a :class:`WriteMarker`.

    The readable summary beside each pickle stays as saved: an attacker can write it too, and nothing may trust it
    to decide what to unpickle.

    :return: the marker files that unpickling the entries would create
    """
    markers = []
    for key, entry in data.items():
        if not (isinstance(entry, dict) and ":serialized:" in entry) or (keys is not None and key not in keys):
            continue
        marker = folder / f"marker_{key}"
        entry[":serialized:"] = base64.b64encode(cloudpickle.dumps(WriteMarker(marker))).decode()
        markers.append(marker)
    assert markers, "nothing to plant a payload in"
    return markers


def pickled_keys(path: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    return [key for key, entry in data.items() if isinstance(entry, dict) and ":serialized:" in entry]
