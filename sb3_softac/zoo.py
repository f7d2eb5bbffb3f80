"""
RL Baselines3 Zoo integration for :class:`sb3_softac.SAC`.

Runs one of rl_zoo3's own command line scripts with an extra algorithm, ``softac``, available::

    python -m sb3_softac.zoo train --algo softac --env Pendulum-v1
    sb3-softac-zoo enjoy --algo softac --env Pendulum-v1 -f logs/

What this module adds on top of rl_zoo3:

* ``softac`` is registered in the zoo's algorithm table (``rl_zoo3.utils.ALGOS``) and in its Optuna sampler and
  converter tables (``rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER`` / ``HYPERPARAMS_CONVERTER``), reusing the zoo's
  SAC search space, so ``--optimize`` and ``--trial-id`` work. Existing entries such as ``sac`` are left untouched.
* ``train --algo softac`` reads the hyperparameter file shipped with this package (see
  :func:`default_hyperparams_path`) unless ``-conf/--conf-file`` is given.
* ``enjoy --algo softac`` loads the agent with a one-transition replay buffer, as the zoo does for its own
  off-policy algorithms.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from sb3_softac import SAC

#: Name under which :class:`sb3_softac.SAC` is known to the zoo (``--algo softac``).
ALGO_NAME = "softac"
#: The zoo algorithm whose Optuna search space is reused for ``softac``.
SEARCH_SPACE_OF = "sac"
#: rl_zoo3 scripts that can be run through this module, in the order they are listed in the help text.
SCRIPTS = ("train", "enjoy", "plot_train", "plot_from_file", "all_plots")
#: File name of the packaged hyperparameters.
HYPERPARAMS_FILE_NAME = f"{ALGO_NAME}.yml"

_PROG = "sb3-softac-zoo"


class UnknownScriptError(ValueError):
    """Raised for a script name that is not one of :data:`SCRIPTS`."""


def default_hyperparams_path() -> Path:
    """
    Locate the hyperparameter file used by ``train --algo softac`` when no ``-conf`` is given.

    The canonical copy lives at ``hyperparams/softac.yml`` in the repository root. An installed package carries it as
    package data in ``sb3_softac/hyperparams/`` (in a source checkout that path is a symlink to the root folder). The
    root folder itself is the fallback for a checkout where the symlink is missing (e.g. ``core.symlinks=false``).

    :return: path of the existing ``softac.yml``
    :raises FileNotFoundError: when neither location holds the file
    """
    package_dir = Path(__file__).parent
    candidates = (
        package_dir / "hyperparams" / HYPERPARAMS_FILE_NAME,
        package_dir.parent / "hyperparams" / HYPERPARAMS_FILE_NAME,
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"The packaged {HYPERPARAMS_FILE_NAME} was not found (looked in: {searched}).")


def register() -> None:
    """
    Make ``softac`` known to rl_zoo3 (idempotent; other algorithms are not modified).

    rl_zoo3's scripts (``train``, ``enjoy``, the experiment manager, ...) import these tables by name, so they all share
    the dictionaries updated here; they must only be built after this call, which holds for the argument parsers since
    they are created when a script runs.

    :raises RuntimeError: if the installed rl_zoo3 has no Optuna search space for :data:`SEARCH_SPACE_OF`
    """
    from rl_zoo3 import hyperparams_opt, utils

    if SEARCH_SPACE_OF not in hyperparams_opt.HYPERPARAMS_SAMPLER or SEARCH_SPACE_OF not in (
        hyperparams_opt.HYPERPARAMS_CONVERTER
    ):
        raise RuntimeError(f"rl_zoo3 does not define an Optuna search space for '{SEARCH_SPACE_OF}'.")

    utils.ALGOS[ALGO_NAME] = SAC
    hyperparams_opt.HYPERPARAMS_SAMPLER[ALGO_NAME] = hyperparams_opt.HYPERPARAMS_SAMPLER[SEARCH_SPACE_OF]
    hyperparams_opt.HYPERPARAMS_CONVERTER[ALGO_NAME] = hyperparams_opt.HYPERPARAMS_CONVERTER[SEARCH_SPACE_OF]


class _PeekError(Exception):
    """A command line that :class:`_PeekParser` cannot read."""


class _PeekParser(argparse.ArgumentParser):
    """Argument parser that raises :class:`_PeekError` instead of printing an error and exiting."""

    def error(self, message: str) -> NoReturn:
        """
        Signal a parse error to the caller.

        :param message: argparse's description of the problem
        :raises _PeekError: always
        """
        raise _PeekError(message)


def _parse_peek(args: Sequence[str]) -> argparse.Namespace | None:
    """
    Read the few ``train`` options this module looks at (algorithm, configuration file, Optuna settings).

    The parser accepts the same spellings as the zoo's (``--algo=softac``, unambiguous prefixes such as ``--conf``).

    :param args: command line of the ``train`` script, without the script name
    :return: namespace with ``algo``, ``conf_file``, ``optimize_hyperparameters``, ``storage`` and ``study_name``, or
        ``None`` if the line is malformed for these options (the zoo's own parser then reports the problem)
    """
    peek = _PeekParser(add_help=False)
    # Same defaults as rl_zoo3's train script.
    peek.add_argument("--algo", default="ppo")
    peek.add_argument("-conf", "--conf-file", default=None)
    peek.add_argument("-optimize", "--optimize-hyperparameters", action="store_true")
    peek.add_argument("--storage", default=None)
    peek.add_argument("--study-name", default=None)
    # Not used, declared so that abbreviations are as (un)ambiguous as for the zoo ("--optimi...").
    peek.add_argument("--optimization-log-path")
    try:
        namespace, _ = peek.parse_known_args(list(args))
    except _PeekError:
        return None
    return namespace


def with_default_conf_file(args: Sequence[str]) -> list[str]:
    """
    Add ``--conf-file <packaged softac.yml>`` to a ``train`` command line that selects ``--algo softac`` without one.

    The option is put first, so that it cannot be swallowed by a multi-value option (``-params a:1 b:2``) given last.
    Command lines for other algorithms, or that already name a configuration, are returned unchanged.

    :param args: command line of the ``train`` script, without the script name
    :return: the command line to pass to the zoo
    """
    peeked = _parse_peek(args)
    if peeked is None or peeked.algo != ALGO_NAME or peeked.conf_file is not None:
        return list(args)
    return ["--conf-file", str(default_hyperparams_path()), *args]


class _InferenceSAC(SAC):
    """
    Loader used for ``enjoy --algo softac`` only: loads a :class:`sb3_softac.SAC` with a one-transition replay buffer.

    rl_zoo3's enjoy script shrinks the replay buffer of the off-policy algorithms it knows by name; this provides the
    same for ``softac``. The returned model is a plain :class:`sb3_softac.SAC`.
    """

    @classmethod
    def load(  # type: ignore[override]
        cls,
        path: Any,
        env: Any = None,
        device: Any = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SAC:
        """
        Load a saved agent for inference.

        :param path: path of the saved ``.zip``
        :param env: optional environment, as for :meth:`stable_baselines3.common.base_class.BaseAlgorithm.load`
        :param device: torch device
        :param custom_objects: objects replacing saved ones
        :param print_system_info: print the system info stored with the model
        :param force_reset: reset the environment before the first ``learn()`` call
        :param kwargs: attribute overrides; ``buffer_size`` defaults to 1 and ``optimize_memory_usage`` to ``False``
        :return: the loaded model
        """
        kwargs.setdefault("buffer_size", 1)
        # SB3's replay buffer rejects optimize_memory_usage together with timeout handling.
        kwargs.setdefault("optimize_memory_usage", False)
        return SAC.load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )


@contextmanager
def _inference_loader() -> Iterator[None]:
    """Use :class:`_InferenceSAC` as the ``softac`` entry of the zoo's table for the duration of the block."""
    from rl_zoo3 import utils

    previous = utils.ALGOS[ALGO_NAME]
    utils.ALGOS[ALGO_NAME] = _InferenceSAC
    try:
        yield
    finally:
        utils.ALGOS[ALGO_NAME] = previous


def _missing_requirements(script_name: str, script_args: Sequence[str]) -> list[str]:
    """
    List modules a zoo script will need but that are not installed, when the zoo would only notice late.

    ``train -optimize`` writes its final report with pandas (through Optuna), i.e. only after all trials have run.

    :param script_name: one of :data:`SCRIPTS`
    :param script_args: the script's command line
    :return: names of the missing modules (empty when nothing is known to be missing)
    """
    if script_name != "train":
        return []
    peeked = _parse_peek(script_args)
    if peeked is None or not peeked.optimize_hyperparameters:
        return []
    return [module for module in ("pandas",) if importlib.util.find_spec(module) is None]


def _study_direction_error(script_args: Sequence[str]) -> str | None:
    """
    Check that an existing Optuna study that ``train -optimize`` would join maximizes its objective.

    The zoo joins an existing study whatever its direction, and it reports mean episodic rewards: a study created
    beforehand as ``minimize`` (Optuna's default, e.g. ``optuna create-study`` without ``--direction maximize``) would
    silently search for the worst hyperparameters. No study or table is created here (SQLite itself creates an empty
    database file on connection, as the zoo does next); storages that cannot be read (study or tables not created yet,
    missing database driver, unreachable server) are left for the zoo to handle.

    :param script_args: command line of the ``train`` script
    :return: an error message, or ``None`` when there is nothing to object to
    """
    peeked = _parse_peek(script_args)
    if peeked is None or not peeked.optimize_hyperparameters or not peeked.storage or not peeked.study_name:
        return None

    import optuna
    from optuna.storages import BaseStorage, JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    storage: BaseStorage | None = None
    try:
        # Same convention as rl_zoo3: a path ending in ".log" is an Optuna journal file, anything else a database URL.
        if peeked.storage.endswith(".log"):
            if not Path(peeked.storage).is_file():
                return None
            storage = JournalStorage(JournalFileBackend(peeked.storage))
        else:
            storage = RDBStorage(peeked.storage, skip_compatibility_check=True, skip_table_creation=True)
        directions = storage.get_study_directions(storage.get_study_id_from_name(peeked.study_name))
    except Exception:  # no such study or storage not usable yet: nothing to check
        return None
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()
    if directions == [optuna.study.StudyDirection.MAXIMIZE]:
        return None
    found = ", ".join(direction.name.lower() for direction in directions)
    return (
        f"the existing study '{peeked.study_name}' in {peeked.storage} optimizes in direction '{found}', but the zoo "
        "maximizes the mean reward; create the study with direction 'maximize' "
        "(optuna create-study --direction maximize ...) or use another --study-name"
    )


def _load_script(name: str) -> Callable[[], Any]:
    """
    Import one rl_zoo3 script lazily (each pulls in different heavy dependencies).

    :param name: one of :data:`SCRIPTS`
    :return: the script's entry function, which reads ``sys.argv``
    """
    if name == "train":
        from rl_zoo3.train import train

        return train
    if name == "enjoy":
        from rl_zoo3.enjoy import enjoy

        return enjoy
    if name == "plot_train":
        from rl_zoo3.plots.plot_train import plot_train

        return plot_train
    if name == "plot_from_file":
        from rl_zoo3.plots.plot_from_file import plot_from_file

        return plot_from_file
    if name == "all_plots":
        from rl_zoo3.plots.all_plots import all_plots

        return all_plots
    raise UnknownScriptError(f"unknown script '{name}'; choose one of: {', '.join(SCRIPTS)}")


def _usage() -> str:
    """:return: the help text of the wrapper itself"""
    return (
        f"usage: {_PROG} SCRIPT [ARGS ...]\n"
        f"       python -m sb3_softac.zoo SCRIPT [ARGS ...]\n\n"
        "Run an rl_zoo3 script with the algorithm 'softac' (sb3_softac.SAC) registered.\n\n"
        f"SCRIPT is one of: {', '.join(SCRIPTS)}\n"
        f"Use '{_PROG} SCRIPT -h' for the options of a script. 'train --algo softac' reads the packaged\n"
        f"hyperparameters ({HYPERPARAMS_FILE_NAME}) unless -conf/--conf-file is given.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of ``sb3-softac-zoo`` and ``python -m sb3_softac.zoo``.

    :param argv: ``[script, *script_args]``; defaults to ``sys.argv[1:]``
    :return: exit status (the zoo scripts themselves exit through ``SystemExit`` on argument errors)
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        stream = sys.stdout if args else sys.stderr
        print(_usage(), file=stream, end="")
        return 0 if args else 2

    script_name, script_args = args[0], args[1:]
    if script_name not in SCRIPTS:
        print(f"{_PROG}: error: unknown script '{script_name}'; choose one of: {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2

    missing = _missing_requirements(script_name, script_args)
    if missing:
        print(
            f"{_PROG}: error: 'train -optimize' needs {', '.join(missing)} to write its report; "
            "install it with: pip install 'rl_zoo3[plots]'",
            file=sys.stderr,
        )
        return 2

    if script_name == "train":
        direction_error = _study_direction_error(script_args)
        if direction_error is not None:
            print(f"{_PROG}: error: {direction_error}", file=sys.stderr)
            return 2

    register()
    try:
        script = _load_script(script_name)
    except ModuleNotFoundError as error:
        if script_name in ("train", "enjoy"):
            raise
        print(
            f"{_PROG}: error: '{script_name}' needs the module '{error.name}'; "
            f"install rl_zoo3's plotting extra: pip install 'rl_zoo3[plots]'",
            file=sys.stderr,
        )
        return 2
    if script_name == "train":
        script_args = with_default_conf_file(script_args)

    saved_argv = sys.argv
    # The zoo's scripts parse sys.argv; the program name shows up in their usage and error messages.
    sys.argv = [f"{_PROG} {script_name}", *script_args]
    try:
        if script_name == "enjoy":
            with _inference_loader():
                script()
        else:
            script()
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    sys.exit(main())
