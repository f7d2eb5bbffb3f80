"""Inspecting saved model archives before they are loaded."""

import io
import json
import pathlib
import zipfile
from typing import Any

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
            raise ValueError(f"{path} is not a model saved by Stable-Baselines3 (no zip archive with 'data').") from error
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
