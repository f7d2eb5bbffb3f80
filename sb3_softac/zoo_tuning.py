"""
Checks and study start-up for ``sb3-softac-zoo train -optimize`` (Optuna hyperparameter tuning through the RL Zoo).

Everything here runs before the first trial, so that a tuning run that is bound to fail says so at once:

* :func:`require_report_modules`: the zoo writes its final report with pandas, i.e. only after all trials have run.
* :func:`prepare_study`: several workers may start together against a storage that holds no tables and no study yet.
  Optuna's own start-up is not safe then: every worker creates the tables and the study, and all but one fail with
  ``IntegrityError`` (or ``OperationalError`` on SQLite). Here each worker creates or joins the study through Optuna's
  public API and retries while another worker is half-way through creating it. It also refuses a study that minimizes,
  since the zoo reports mean episodic rewards.

This module depends on Optuna only, not on rl_zoo3.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.exc import SQLAlchemyError

#: How long a worker keeps retrying while the storage or the study is being created by another worker, in seconds.
STUDY_START_TIMEOUT_S = 60.0
#: Modules that ``train -optimize`` needs only after the last trial (for its report).
REPORT_MODULES = ("pandas",)


class ZooUsageError(Exception):
    """A command line the zoo would run but could not complete; the message says what to change."""


def require_report_modules() -> None:
    """
    Refuse to start tuning when the final report cannot be written.

    :raises ZooUsageError: naming the missing modules and how to install them
    """
    missing = [module for module in REPORT_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise ZooUsageError(
            f"'train -optimize' needs {', '.join(missing)} to write its report; "
            "install it with: pip install 'rl_zoo3[plots]'"
        )


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """
    Open an Optuna storage as rl_zoo3 does: a path ending in ``.log`` is a journal file, anything else a database URL.

    Opening a database creates Optuna's tables when they are missing; the journal's folder is created as by the zoo.

    :param storage: the zoo's ``--storage`` value
    :return: the storage
    """
    if storage.endswith(".log"):
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.storages.RDBStorage(storage)


def _close(storage: optuna.storages.BaseStorage) -> None:
    """
    Release the connections of a database storage (the zoo opens its own from the URL).

    :param storage: a storage returned by :func:`open_storage`
    """
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.engine.dispose()


def prepare_study(storage: str, study_name: str | None, timeout: float = STUDY_START_TIMEOUT_S) -> None:
    """
    Create the storage's tables and the study (direction ``maximize``) or join them, whichever worker comes first.

    A worker that collides with another one creating the same tables or study gets a database error; it waits a
    little (random, growing delays, so that colliding workers spread out) and tries again until ``timeout``. Without a
    study name only the tables are created: Optuna then gives each worker a study of its own.

    :param storage: the zoo's ``--storage`` value (journal file path or database URL)
    :param study_name: the zoo's ``--study-name``, or ``None``
    :param timeout: seconds after which the last database error is raised
    :raises ZooUsageError: if the existing study does not maximize
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            opened = open_storage(storage)
            try:
                if study_name is None:
                    return
                study = optuna.create_study(
                    storage=opened, study_name=study_name, direction="maximize", load_if_exists=True
                )
                directions = study.directions
            finally:
                _close(opened)
            break
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
            if time.monotonic() + delay > deadline:
                raise
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            print(f"Waiting for the Optuna storage (another worker may be creating it): {first_line}", file=sys.stderr)
            time.sleep(delay * (1.0 + random.random()))
            delay = min(2 * delay, 1.0)

    if directions != [optuna.study.StudyDirection.MAXIMIZE]:
        found = ", ".join(direction.name.lower() for direction in directions)
        raise ZooUsageError(
            f"the existing study '{study_name}' in {storage} optimizes in direction '{found}', but the zoo maximizes "
            "the mean reward; create the study with direction 'maximize' (optuna create-study --direction maximize "
            "...) or use another --study-name"
        )
