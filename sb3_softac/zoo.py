"""
RL Baselines3 Zoo integration for :class:`sb3_softac.SAC`.

Runs one of rl_zoo3's own scripts with an extra algorithm, ``softac``, available::

    python -m sb3_softac.zoo train --algo softac --env Pendulum-v1
    sb3-softac-zoo enjoy --algo softac --env Pendulum-v1 -f logs/

The core is :func:`register` and the inference loader; the command line (:func:`main`) runs the zoo's scripts with
them in place:

* :func:`register` adds ``softac`` to the zoo's algorithm table (``rl_zoo3.utils.ALGOS``) and to its Optuna sampler
  and converter tables, reusing the zoo's SAC search space, so ``-optimize`` and ``--trial-id`` work. Existing entries
  such as ``sac`` are left untouched. It also lets ``rl_zoo3.callbacks.ParallelTrainCallback`` train a
  :class:`sb3_softac.SAC` in the background.
* ``train --algo softac`` reads the hyperparameter file shipped with this package (:func:`default_hyperparams_path`)
  unless ``-conf/--conf-file`` is given; ``-conf`` also accepts the bare name of a packaged file
  (``softac_droq.yml``). Tuning workers that start together against a fresh storage are safe
  (:mod:`sb3_softac.zoo_tuning`).
* ``enjoy``, ``record_video`` and ``push_to_hub`` load the agent with a one-transition replay buffer, as the zoo does
  for its own off-policy algorithms; ``record_training`` replays every saved model through this wrapper too.
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rl_zoo3 import callbacks, hyperparams_opt, utils
from rl_zoo3 import train as zoo_train
from rl_zoo3.exp_manager import ExperimentManager

from sb3_softac import SAC, zoo_tuning
from sb3_softac.hyperparams import HYPERPARAMS_DIR

#: Name under which :class:`sb3_softac.SAC` is known to the zoo (``--algo softac``).
ALGO_NAME = "softac"
#: The zoo algorithm whose Optuna search space is reused for ``softac``.
SEARCH_SPACE_OF = "sac"
#: File name of the packaged hyperparameters read by ``train --algo softac``.
HYPERPARAMS_FILE_NAME = f"{ALGO_NAME}.yml"

# rl_zoo3 scripts run through this module: the ones written as functions (module, function name), and the ones written
# as ``if __name__ == "__main__":`` blocks (module, None). Keys are in the order of the help text.
_SCRIPTS: dict[str, tuple[str, str | None]] = {
    "train": ("rl_zoo3.train", "train"),
    "enjoy": ("rl_zoo3.enjoy", "enjoy"),
    "record_video": ("rl_zoo3.record_video", None),
    "record_training": ("rl_zoo3.record_training", None),
    "push_to_hub": ("rl_zoo3.push_to_hub", None),
    "load_from_hub": ("rl_zoo3.load_from_hub", None),
    "plot_train": ("rl_zoo3.plots.plot_train", "plot_train"),
    "plot_from_file": ("rl_zoo3.plots.plot_from_file", "plot_from_file"),
    "all_plots": ("rl_zoo3.plots.all_plots", "all_plots"),
}
#: Names of the rl_zoo3 scripts that can be run through this module.
SCRIPTS = tuple(_SCRIPTS)
# Scripts that replay a saved agent: the replay buffer they load it with is never used.
_REPLAY_SCRIPTS = ("enjoy", "record_video", "push_to_hub")
# Scripts that need rl_zoo3's plotting extra.
_PLOT_SCRIPTS = ("plot_train", "plot_from_file", "all_plots")
# Methods of rl_zoo3's ParallelTrainCallback that name SB3's SAC (the global ``SAC`` of rl_zoo3.callbacks).
_PARALLEL_TRAIN_METHODS = ("_init_callback", "_on_rollout_end")
# Attribute that marks a method already wrapped by _dispatcher.
_DISPATCH_MARK = "_softac_dispatch"

_PROG = "sb3-softac-zoo"
# This module's import name (``__name__`` is "__main__" under ``python -m``).
_MODULE = "sb3_softac.zoo"


def default_hyperparams_path() -> Path:
    """
    :return: path of the packaged ``softac.yml``, read by ``train --algo softac`` when no ``-conf`` is given
    """
    return HYPERPARAMS_DIR / HYPERPARAMS_FILE_NAME


def _softac_variant(method: Callable[..., Any]) -> Callable[..., Any]:
    """
    Rebuild one of ParallelTrainCallback's methods with the global name ``SAC`` bound to :class:`sb3_softac.SAC`.

    The copy shares the method's code; only its globals differ, in a dictionary of its own (rl_zoo3's module is not
    modified).

    :param method: the original function
    :return: the same function, reading ``SAC`` as :class:`sb3_softac.SAC`
    """
    softac_globals = {**method.__globals__, "SAC": SAC}
    return types.FunctionType(method.__code__, softac_globals, method.__name__, method.__defaults__, method.__closure__)


def _dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    """
    Wrap one of ParallelTrainCallback's methods: our models run :func:`_softac_variant`, any other model the original.

    :param original: the method as rl_zoo3 defines it
    :return: the method to put in its place (marked, so that it is not wrapped twice)
    """
    softac_method = _softac_variant(original)

    @functools.wraps(original)
    def dispatch(self: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = softac_method if isinstance(self.model, SAC) else original
        return chosen(self, *args, **kwargs)

    setattr(dispatch, _DISPATCH_MARK, True)
    return dispatch


def _accept_softac_in_parallel_training() -> None:
    """
    Let ``rl_zoo3.callbacks.ParallelTrainCallback`` run with :class:`sb3_softac.SAC` (idempotent).

    The callback checks the model against SB3's ``SAC`` and ``TQC`` and reloads it with the class it matched; for our
    SAC that check fails. Each method that names ``SAC`` (:data:`_PARALLEL_TRAIN_METHODS`) is replaced by a dispatcher
    (:func:`_dispatcher`); rl_zoo3's module and the methods' code are left as they are.
    """
    parallel = callbacks.ParallelTrainCallback
    for name in _PARALLEL_TRAIN_METHODS:
        method = parallel.__dict__[name]
        if not getattr(method, _DISPATCH_MARK, False):
            setattr(parallel, name, _dispatcher(method))


def register() -> None:
    """
    Make ``softac`` known to rl_zoo3 (idempotent; other algorithms are not modified).

    rl_zoo3's scripts (``train``, ``enjoy``, the experiment manager, ...) import these tables by name, so they all share
    the dictionaries updated here; they must only be built after this call, which holds for the argument parsers since
    they are created when a script runs. ``rl_zoo3.callbacks.ParallelTrainCallback`` accepts :class:`sb3_softac.SAC`
    after this call (see :func:`_accept_softac_in_parallel_training`).

    :raises RuntimeError: if the installed rl_zoo3 has no Optuna search space for :data:`SEARCH_SPACE_OF`
    """
    if SEARCH_SPACE_OF not in hyperparams_opt.HYPERPARAMS_SAMPLER or SEARCH_SPACE_OF not in (
        hyperparams_opt.HYPERPARAMS_CONVERTER
    ):
        raise RuntimeError(f"rl_zoo3 does not define an Optuna search space for '{SEARCH_SPACE_OF}'.")

    utils.ALGOS[ALGO_NAME] = SAC
    hyperparams_opt.HYPERPARAMS_SAMPLER[ALGO_NAME] = hyperparams_opt.HYPERPARAMS_SAMPLER[SEARCH_SPACE_OF]
    hyperparams_opt.HYPERPARAMS_CONVERTER[ALGO_NAME] = hyperparams_opt.HYPERPARAMS_CONVERTER[SEARCH_SPACE_OF]
    _accept_softac_in_parallel_training()


class _InferenceSAC(SAC):
    """
    Loader used while a zoo script replays a policy: loads a :class:`sb3_softac.SAC` with a one-transition buffer.

    rl_zoo3's replay scripts shrink the replay buffer of the off-policy algorithms they know by name; this provides the
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


# push_to_hub writes the class name of the table entry into the model card: the entry stands for sb3_softac.SAC.
_InferenceSAC.__name__ = SAC.__name__


@contextmanager
def _replaced(namespace: Any, name: str, value: Any) -> Iterator[None]:
    """
    Set an attribute of a module or class for the duration of the block.

    :param namespace: the module or class
    :param name: attribute name
    :param value: value inside the block
    """
    previous = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, previous)


@contextmanager
def _replaced_item(mapping: MutableMapping[str, Any], key: str, value: Any) -> Iterator[None]:
    """
    Set an entry of a dictionary for the duration of the block.

    :param mapping: the dictionary
    :param key: entry to set (it must exist)
    :param value: value inside the block
    """
    previous = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = previous


def _inference_loader() -> AbstractContextManager[None]:
    """:return: a context in which the ``softac`` entry of the zoo's table is :class:`_InferenceSAC`"""
    return _replaced_item(utils.ALGOS, ALGO_NAME, _InferenceSAC)


class _ZooExperimentManager(ExperimentManager):
    """
    The zoo's experiment manager as ``sb3-softac-zoo train`` runs it.

    The zoo's own parser reads the command line; this class only acts on the values it passes on: the packaged
    hyperparameters for ``--algo softac`` (or a packaged file named by ``-conf``), and the Optuna checks and study
    start-up of :mod:`sb3_softac.zoo_tuning` before tuning.
    """

    def __init__(self, args: Any, algo: str, *positional: Any, config: str | None = None, **keywords: Any) -> None:
        """
        :param args: the zoo's parsed command line (saved with the run as ``args.yml``)
        :param algo: the zoo's ``--algo``
        :param positional: the zoo's other positional arguments, passed on unchanged
        :param config: the zoo's ``-conf/--conf-file``
        :param keywords: the zoo's other keyword arguments, passed on unchanged
        """
        if config is None and algo == ALGO_NAME:
            config = str(default_hyperparams_path())
        elif config is not None and not Path(config).exists() and (HYPERPARAMS_DIR / config).is_file():
            config = str(HYPERPARAMS_DIR / config)
        # args.yml then records the file that was actually read.
        args.conf_file = keywords["config"] = config
        super().__init__(args, algo, *positional, **keywords)

    def setup_experiment(self) -> Any:
        """
        Check what tuning needs before anything is created, then set up as the zoo does.

        :return: the zoo's result (``None`` when tuning)
        :raises zoo_tuning.ZooUsageError: when tuning could not complete (see :mod:`sb3_softac.zoo_tuning`)
        """
        if self.optimize_hyperparameters:
            zoo_tuning.require_report_modules()
            if self.storage is not None:
                zoo_tuning.prepare_study(self.storage, self.study_name)
        return super().setup_experiment()


def _ffmpeg_folder(stack: ExitStack) -> Path | None:
    """
    Find a folder to put on ``PATH`` so that rl_zoo3's ``record_training`` finds an ``ffmpeg`` program.

    :param stack: owns the temporary folder, if one is made
    :return: ``None`` when ``ffmpeg`` is on ``PATH`` already, else a temporary folder linking to imageio-ffmpeg's copy
    :raises zoo_tuning.ZooUsageError: when there is no ffmpeg at all
    """
    if shutil.which("ffmpeg") is not None:
        return None
    try:
        import imageio_ffmpeg
    except ModuleNotFoundError:
        raise zoo_tuning.ZooUsageError(
            "'record_training' runs the ffmpeg program, which is not on PATH; install it (apt-get install ffmpeg) "
            "or pip install imageio-ffmpeg"
        ) from None
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="softac-ffmpeg-")))
    (folder / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    return folder


def _record_training_context(stack: ExitStack) -> None:
    """
    Prepare ``record_training``: its replays of each saved model run through this wrapper, and it finds ffmpeg.

    rl_zoo3's ``record_training`` replays each model with ``subprocess.call(["python", "-m", "rl_zoo3.record_video",
    ...])``, where ``softac`` is unknown; those calls become ``sb3-softac-zoo record_video ...`` with this interpreter.

    :param stack: holds the changes until the script has run
    """
    real_call = subprocess.call
    zoo_replay = ["python", "-m", "rl_zoo3.record_video"]

    def call(command: Any, *args: Any, **kwargs: Any) -> int:
        if isinstance(command, list) and command[: len(zoo_replay)] == zoo_replay:
            command = [sys.executable, "-m", _MODULE, "record_video", *command[len(zoo_replay) :]]
        return real_call(command, *args, **kwargs)

    stack.enter_context(_replaced(subprocess, "call", call))
    folder = _ffmpeg_folder(stack)
    if folder is not None:
        path = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
        stack.enter_context(_replaced_item(os.environ, "PATH", path))


def _load_script(name: str) -> Callable[[], Any]:
    """
    Import one rl_zoo3 script lazily (each pulls in different dependencies).

    :param name: one of :data:`SCRIPTS`
    :return: a callable that runs the script, which reads ``sys.argv``
    :raises zoo_tuning.ZooUsageError: when a plotting script's dependencies are missing
    """
    module_name, function_name = _SCRIPTS[name]
    if function_name is None:
        return functools.partial(runpy.run_module, module_name, run_name="__main__")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if name not in _PLOT_SCRIPTS:
            raise
        raise zoo_tuning.ZooUsageError(
            f"'{name}' needs the module '{error.name}'; install rl_zoo3's plotting extra: pip install 'rl_zoo3[plots]'"
        ) from error
    script: Callable[[], Any] = getattr(module, function_name)
    return script


def _usage() -> str:
    """:return: the help text of the wrapper itself"""
    return (
        f"usage: {_PROG} SCRIPT [ARGS ...]\n"
        f"       python -m {_MODULE} SCRIPT [ARGS ...]\n\n"
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
    if script_name not in _SCRIPTS:
        print(f"{_PROG}: error: unknown script '{script_name}'; choose one of: {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2

    register()
    try:
        script = _load_script(script_name)
        with ExitStack() as stack:
            if script_name == "train":
                stack.enter_context(_replaced(zoo_train, "ExperimentManager", _ZooExperimentManager))
            elif script_name in _REPLAY_SCRIPTS:
                stack.enter_context(_inference_loader())
            elif script_name == "record_training":
                _record_training_context(stack)
            # The zoo's scripts parse sys.argv; the program name shows up in their usage and error messages.
            stack.enter_context(_replaced(sys, "argv", [f"{_PROG} {script_name}", *script_args]))
            script()
    except zoo_tuning.ZooUsageError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
