"""Every code block of the README, ``docs/*.md`` and ``CONTRIBUTING.md`` is run or checked, and their links resolve.

Each fenced block is classified by its language, and each command of a shell block by its program:

* ``python``: run in a fresh interpreter in a temporary folder, with its training budgets cut to 150 environment steps
  (:func:`small_budget`). A block right after ``<!-- docs-test: continue -->`` continues the previous Python block
  of its file: the two run as one script.
* ``yaml``: its first line names the file (``# my_softac.yml``); it is parsed and written into the folder where the
  shell commands of its document run.
* ``bash`` / ``sh`` (and ``console``, whose commands start with ``$``): every command must match a rule of
  :func:`classify`. RL Zoo (``sb3-softac-zoo``, ``python -m sb3_softac.zoo``) and ``optuna`` commands have their
  arguments parsed by the programs' own parsers, and those that need neither the network, a database server, an
  existing study nor a missing optional package are also run, in document order, with small budgets
  (:func:`zoo_budget`), in one folder per document. Commands that CI runs or that install something are checked
  without running them: ``.ci/`` scripts and their options exist, ``pip install`` names extras that
  ``pyproject.toml`` defines, ``pytest`` options and markers exist, lint tools are in the ``dev`` extra, and a
  benchmark script's own ``parse_args`` accepts the arguments.

Anything else fails ``test_every_block_and_command_is_known``: a new kind of block or command needs a rule here.

The zoo and Optuna commands are parsed and run by this file itself, run as a script in a child process
(``python tests/test_docs.py parse|run COMMANDS.json RESULTS.json``), so that one interpreter serves all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from envs import REPO_ROOT, run_python
from packaging.requirements import InvalidRequirement, Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

DOCS = (REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "docs").glob("*.md")))
README_MAX_LINES = 300
#: Training budget of the Python blocks (env steps) and of the zoo commands.
PYTHON_BUDGET = 150
ZOO_STEPS = "200"
SHELLS = ("bash", "sh", "console")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
#: Modules the zoo scripts need beyond the zoo extra; a command whose script needs a missing one is parsed, not run.
ZOO_SCRIPT_MODULES = {
    "plot_train": ("seaborn",),
    "all_plots": ("seaborn",),
    "plot_from_file": ("seaborn",),
    "record_video": ("pygame", "moviepy"),
    "record_training": ("pygame", "moviepy"),
}
ZOO_NETWORK_SCRIPTS = ("push_to_hub", "load_from_hub")
#: Options of ``python -m pytest`` that take a value.
PYTEST_VALUE_OPTIONS = ("-n", "-m", "-k", "-p", "--maxfail", "--durations", "-c", "--rootdir")


def rel(path: Path) -> str:
    """:return: ``path`` relative to the repository, as the documents write it"""
    return path.relative_to(REPO_ROOT).as_posix()


# ---------------------------------------------------------------------------------------------------------------------
# Reading the documents


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document."""

    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # the ``<!-- docs-test: ... -->`` line right before the fence

    @property
    def where(self) -> str:
        return f"{rel(self.doc)}:{self.line}"


def read_blocks(doc: Path) -> list[Block]:
    """:return: the fenced code blocks of a markdown file, in order"""
    lines = doc.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, start = match.group(1), index
        index += 1
        body = []
        while index < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[index]):
            body.append(lines[index])
            index += 1
        index += 1
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.match(previous)
        blocks.append(Block(doc, start + 1, match.group(2).lower(), "\n".join(body) + "\n", marker and marker.group(1)))
    return blocks


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)]


@dataclass(frozen=True)
class Command:
    """One simple command of a shell block, split into words, with its redirections and control operators removed."""

    block: Block
    line: int
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]
    kind: str = ""  # set by classify
    args: tuple[str, ...] = field(default=())  # the words after the program (and its subcommand, for pip)

    @property
    def where(self) -> str:
        return f"{rel(self.block.doc)}:{self.line}"

    @property
    def text(self) -> str:
        return shlex.join([*(f"{name}={value}" for name, value in self.env), *self.argv])


def shell_commands(block: Block) -> list[Command]:
    """:return: the commands of a shell block (continuation lines joined, comments dropped), unclassified"""
    logical: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if block.lang == "console":
            if not raw.startswith("$ ") and not pending:
                continue  # output
            raw = raw[2:] if raw.startswith("$ ") else raw
        if not pending:
            first = offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append((first, pending + raw))
        pending = ""
    commands = []
    for line, text in logical:
        words = shlex.split(text, comments=True)
        current: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "&"):
                if current:
                    commands.append(_command(block, line, current))
                current = []
            else:
                current.append(word)
    return commands


def _command(block: Block, line: int, words: list[str]) -> Command:
    """:return: a command without its redirections (``> file``, ``2>&1``), its ``NAME=value`` prefix split off"""
    argv: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d?>>?", word):
            skip = True
        elif not re.fullmatch(r"\d?>>?\S+", word):
            argv.append(word)
    env = []
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env.append((name, value))
    return Command(block, line, tuple(env), tuple(argv))


def classify(command: Command) -> Command:
    """
    :return: the command with its ``kind`` and ``args`` set
    :raises ValueError: when no rule knows the command
    """
    argv = list(command.argv)
    if argv[:1] in (["python"], ["python3"]) and len(argv) > 2 and argv[1] == "-m":
        program, rest = argv[2], argv[3:]
    elif argv[:1] in (["python"], ["python3"]) and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        return _with(command, "benchmark", argv[1:])
    elif argv:
        program, rest = argv[0], argv[1:]
    else:
        raise ValueError("empty command")
    if program in ("sb3-softac-zoo", "sb3_softac.zoo"):
        return _with(command, "zoo", rest)
    if program == "optuna":
        return _with(command, "optuna", rest)
    if program == "pip" and rest[:1] == ["install"]:
        return _with(command, "pip", rest[1:])
    if program == "pytest":
        return _with(command, "pytest", rest)
    if program in ("ruff", "mypy"):
        return _with(command, "lint", [program, *rest])
    if program == "bash" and rest[:1] and rest[0].startswith(".ci/"):
        return _with(command, "ci", rest)
    raise ValueError(f"no rule runs or checks the command {command.text!r}")


def _with(command: Command, kind: str, args: list[str]) -> Command:
    return Command(command.block, command.line, command.env, command.argv, kind, tuple(args))


def classified_commands() -> list[Command]:
    """:return: every command of every shell block, classified; unknown ones are left out (the first test fails)"""
    commands = []
    for block in BLOCKS:
        if block.lang in SHELLS:
            for command in shell_commands(block):
                with contextlib.suppress(ValueError):
                    commands.append(classify(command))
    return commands


COMMANDS = classified_commands()


def python_groups() -> list[list[Block]]:
    """:return: the Python blocks, those after a ``continue`` marker joined to the group before them"""
    groups: list[list[Block]] = []
    for block in BLOCKS:
        if block.lang != "python":
            continue
        if block.marker == "continue" and groups and groups[-1][-1].doc == block.doc:
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def small_budget(source: str) -> str:
    """:return: a Python block with its training budgets (``total_timesteps=``, ``learn(N``, ``"-n", "N"``) cut"""
    source = re.sub(r"(total_timesteps\s*=\s*)[\d_]+", rf"\g<1>{PYTHON_BUDGET}", source)
    source = re.sub(r"(\.learn\(\s*)[\d_]+", rf"\g<1>{PYTHON_BUDGET}", source)
    return re.sub(r'("-n",\s*")\d+(")', rf"\g<1>{ZOO_STEPS}\g<2>", source)


def yaml_file_name(block: Block) -> str:
    """:return: the file a YAML block stands for, from its first line (``# name.yml``)"""
    match = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)", block.text.splitlines()[0].strip())
    if match is None:
        raise ValueError(f"{block.where}: a yaml block starts with a '# FILE.yml' comment naming its file")
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------------------
# What the zoo and Optuna commands may run


def _option(args: tuple[str, ...], *names: str) -> str | None:
    """:return: the value of the last of the options ``names`` in ``args``, or None"""
    value = None
    for index, word in enumerate(args[:-1]):
        if word in names:
            value = args[index + 1]
    return value


def why_not_run(command: Command) -> str | None:
    """:return: why a zoo or Optuna command is parsed only, or None when it is run"""
    args = command.args
    storage = _option(args, "--storage")
    if storage is not None and "://" in storage:
        return "needs a database server"
    if command.kind == "optuna":
        return None
    script = args[0] if args else ""
    if script in ZOO_NETWORK_SCRIPTS:
        return "needs the Hugging Face Hub (tests/test_zoo.py runs it up to the network calls)"
    if "--trial-id" in args:
        return "needs a finished study"
    missing = [name for name in ZOO_SCRIPT_MODULES.get(script, ()) if importlib.util.find_spec(name) is None]
    env_id = _option(args, "--env", "-e") or ""
    if any(name in env_id for name in ("Hopper", "HalfCheetah", "Walker", "Ant", "Humanoid", "Swimmer")):
        missing += [] if importlib.util.find_spec("mujoco") else ["mujoco"]
    return f"needs {', '.join(missing)}" if missing else None


def zoo_budget(args: tuple[str, ...]) -> list[str]:
    """:return: a zoo command's arguments with small budgets appended (argparse keeps an option's last value)"""
    script, extra = args[0] if args else "", []
    if any(word in ("-h", "--help") for word in args):
        return list(args)
    if script == "train":
        extra += ["-n", ZOO_STEPS]
        if "-optimize" in args:
            extra += ["--n-trials", "1", "--n-startup-trials", "1", "--n-evaluations", "1", "--eval-episodes", "1"]
        elif "--eval-freq" in args:
            extra += ["--eval-freq", "100", "--eval-episodes", "2"]
    elif script == "enjoy":
        extra += ["-n", "100", "--no-render"]  # a window would play at the environment's frame rate
    elif script in ("record_video", "record_training"):
        extra += ["-n", "100"]
    return [*args, *extra]


def program_runs(mode: str, args: list[list[Any]], cwd: Path) -> list[list[Any]]:
    """
    Run this file as a script to parse or run zoo and Optuna commands in one child interpreter.

    :param mode: ``parse`` or ``run``
    :param args: ``[program, args]`` pairs, program ``zoo`` or ``optuna``
    :param cwd: working directory of the child
    :return: one ``[status, message]`` per command (``run`` stops at the first failure)
    """
    commands, results = cwd / "commands.json", cwd / "results.json"
    commands.write_text(json.dumps(args))
    run_python(__file__, mode, str(commands), str(results), cwd=cwd, timeout=600)
    outcome: list[list[Any]] = json.loads(results.read_text())
    return outcome


# ---------------------------------------------------------------------------------------------------------------------
# Checks of the commands that are not run


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@cache
def help_text(*program: str) -> str:
    """:return: the ``--help`` output of a program, or "" when it is not installed"""
    try:
        result = subprocess.run([*program, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return ""
    return result.stdout + result.stderr


def _assert_paths_exist(command: Command, words: list[str]) -> None:
    for word in words:
        path = REPO_ROOT / word.split("::")[0]
        assert word.startswith("-") or path.exists(), f"{command.where}: {word} does not exist"


def check_pip(command: Command) -> None:
    extras = set(pyproject()["project"]["optional-dependencies"])
    names = {pyproject()["project"]["name"].replace("-", "_"), pyproject()["project"]["name"]}
    words = list(command.args)
    while words:
        word = words.pop(0)
        if word == "--index-url":
            assert words and words.pop(0).startswith("https://"), f"{command.where}: --index-url needs a URL"
            continue
        assert not word.startswith("-"), f"{command.where}: pip option {word} has no rule in tests/test_docs.py"
        if word.startswith("."):  # this checkout, with extras
            requirement = Requirement(f"sb3_softac{word[1:]}")
        else:
            try:
                requirement = Requirement(word)
            except InvalidRequirement as error:
                raise AssertionError(f"{command.where}: {word} is not a requirement: {error}") from error
        if requirement.name in names or word.startswith("."):
            assert requirement.extras <= extras, f"{command.where}: no extra {requirement.extras - extras} in pyproject"


def check_ci(command: Command) -> None:
    script, *options = command.args
    path = REPO_ROOT / script
    assert path.is_file(), f"{command.where}: {script} does not exist"
    text = path.read_text()
    for name, _ in command.env:
        assert f"${{{name}" in text or f"${name}" in text, f"{command.where}: {script} does not read ${name}"
    if script == ".ci/stack":
        (name,) = options
        assert (REPO_ROOT / ".ci" / "stacks" / f"{name}.txt").is_file(), f"{command.where}: no stack {name}"
    else:
        for option in options:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{command.where}: {script} {option}?"


def check_pytest(command: Command) -> None:
    usage = help_text(sys.executable, "-m", "pytest")
    markers = {entry.split(":")[0].strip() for entry in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    words, paths = list(command.args), []
    while words:
        word = words.pop(0)
        if not word.startswith("-"):
            paths.append(word)
            continue
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", usage), f"{command.where}: pytest has no {word}"
        if word in PYTEST_VALUE_OPTIONS:
            value = words.pop(0)
            if word == "-m":
                used = set(re.findall(r"\w+", value)) - {"and", "or", "not"}
                assert used <= markers, f"{command.where}: undeclared markers {used - markers}"
    _assert_paths_exist(command, paths)


def check_lint(command: Command) -> None:
    tool, *rest = command.args
    dev = " ".join(pyproject()["project"]["optional-dependencies"]["dev"])
    assert re.search(rf"\b{tool}\b", dev), f"{command.where}: {tool} is not in the dev extra"
    subcommand = [rest[0]] if tool == "ruff" and rest else []
    assert tool != "ruff" or subcommand in (["check"], ["format"]), f"{command.where}: ruff {subcommand}?"
    usage = help_text(tool, *subcommand)
    options = [word for word in rest[len(subcommand) :] if word.startswith("-")]
    for option in options if usage else []:
        assert option in usage, f"{command.where}: {tool} has no option {option}"
    _assert_paths_exist(command, [word for word in rest[len(subcommand) :] if not word.startswith("-")])


def check_benchmark(command: Command) -> None:
    script, *args = command.args
    path = REPO_ROOT / script
    assert path.is_file() and path.parent == REPO_ROOT / "benchmarks", f"{command.where}: no benchmark {script}"
    module = importlib.import_module(path.stem)
    assert hasattr(module, "parse_args"), f"{script} has no parse_args(argv): tests/test_docs.py checks it"
    stderr = io.StringIO()
    status: int | str | None = 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(args)
    except SystemExit as error:
        status = error.code
    assert status == 0, f"{command.where}: {command.text}\n{stderr.getvalue()}"
    _assert_paths_exist(command, [word for word in args if word.startswith("benchmarks/")])


CHECKS = {
    "pip": check_pip,
    "ci": check_ci,
    "pytest": check_pytest,
    "lint": check_lint,
    "benchmark": check_benchmark,
}


# ---------------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: f"{block.where}:{block.lang}")
def test_every_block_and_command_is_known(block: Block) -> None:
    """A block of unknown language, or a shell command that no rule runs or checks, fails here."""
    assert block.lang in ("python", "yaml", *SHELLS), f"{block.where}: no rule for ```{block.lang} blocks"
    assert block.marker in (None, "continue"), f"{block.where}: unknown marker {block.marker!r}"
    if block.lang == "python":
        compile(block.text, block.where, "exec")
    elif block.lang == "yaml":
        yaml_file_name(block)
        content = yaml.safe_load(block.text)
        assert isinstance(content, dict) and all("policy" in entry for entry in content.values()), block.where
    else:
        commands = shell_commands(block)
        assert commands, f"{block.where}: a shell block without a command"
        for command in commands:
            classify(command)


@pytest.mark.parametrize("group", python_groups(), ids=lambda group: "+".join(f"{block.where}" for block in group))
def test_python_blocks_run(group: list[Block], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text("\n".join(small_budget(block.text) for block in group))
    run_python(str(script), cwd=tmp_path, timeout=300)


@pytest.mark.parametrize(
    "command",
    [command for command in COMMANDS if command.kind in CHECKS],
    ids=lambda command: f"{command.where}:{command.kind}",
)
def test_checked_commands(command: Command) -> None:
    """Commands that CI runs, or that install: their target exists and their options parse."""
    CHECKS[command.kind](command)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[Command, list[Any]]:
    """:return: for each zoo and Optuna command, the outcome of parsing its arguments with the program's parser"""
    commands = [command for command in COMMANDS if command.kind in ("zoo", "optuna")]
    outcomes = program_runs("parse", [[c.kind, list(c.args)] for c in commands], tmp_path_factory.mktemp("parse"))
    return dict(zip(commands, outcomes, strict=True))


@pytest.mark.parametrize(
    "command",
    [command for command in COMMANDS if command.kind in ("zoo", "optuna")],
    ids=lambda command: f"{command.where}:{command.kind}",
)
def test_zoo_and_optuna_arguments_parse(command: Command, parsed: dict[Command, list[Any]]) -> None:
    status, message = parsed[command]
    assert status == 0, f"{command.where}: {command.text}\n{message}"


def _sessions() -> list[Path]:
    return [doc for doc in DOCS if any(c.block.doc == doc and c.kind in ("zoo", "optuna") for c in COMMANDS)]


@pytest.mark.parametrize("doc", _sessions(), ids=rel)
def test_zoo_and_optuna_commands_run(doc: Path, tmp_path: Path) -> None:
    """The runnable zoo and Optuna commands of a document, in its order, in one folder, with small budgets."""
    for block in BLOCKS:
        if block.doc == doc and block.lang == "yaml":
            (tmp_path / yaml_file_name(block)).write_text(block.text)
    commands = [c for c in COMMANDS if c.block.doc == doc and c.kind in ("zoo", "optuna") and why_not_run(c) is None]
    runs = [[c.kind, zoo_budget(c.args) if c.kind == "zoo" else list(c.args)] for c in commands]
    outcomes = program_runs("run", runs, tmp_path)
    for command, (status, message) in zip(commands, outcomes, strict=False):
        assert status == 0, f"{command.where}: {command.text}\n{message}"
    assert len(outcomes) == len(commands)


def test_links_resolve() -> None:
    """Relative links and images between the documents point to files (and headings) that exist."""
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if not path.exists():
                broken.append(f"{rel(doc)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{rel(doc)}: {target} (no such heading)")
    assert not broken, broken


def heading_anchors(doc: Path) -> set[str]:
    """:return: the anchors GitHub makes of a document's headings"""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_readme_is_short_and_the_docs_tell_no_history() -> None:
    """The README stays a user's page; commit hashes, issue numbers and session notes belong in the CHANGELOG."""
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES
    for doc in DOCS:
        text = doc.read_text()
        hashes = [word for word in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", word)]
        hashes = [word for word in hashes if re.search(r"[a-f]", word)]
        assert not hashes, f"{rel(doc)}: commit hashes {hashes}"
        assert not re.search(r"\bissues?\s+#?\d+|\bthis session\b", text, flags=re.IGNORECASE), rel(doc)


# ---------------------------------------------------------------------------------------------------------------------
# The child process: python tests/test_docs.py parse|run COMMANDS.json RESULTS.json


class _Parsed(Exception):
    """Raised by the patched parser once a script's arguments have parsed."""


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def _stub_missing_modules(script: str) -> None:
    """Let a zoo script whose optional plotting packages are missing import, so that its arguments can be parsed."""

    class Stub(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    for name in ZOO_SCRIPT_MODULES.get(script, ()):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = Stub(name)
    if script == "push_to_hub":
        # The Hub integration renamed a function rl_zoo3 imports (see docs/zoo-and-tuning.md); parsing needs no Hub.
        hub = importlib.import_module("huggingface_sb3.push_to_hub")
        if not hasattr(hub, "generate_metadata"):
            hub.generate_metadata = lambda *args, **kwargs: {}  # type: ignore[attr-defined]


def _run_program(kind: str, args: list[str], parse_only: bool) -> tuple[int, str]:
    """:return: the exit status of a zoo or Optuna command run in this process, and its error output"""
    from sb3_softac import zoo

    stderr = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if parse_only:
                stack.enter_context(_stop_after_parsing())
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(stderr))
            if kind == "zoo":
                if parse_only and args:
                    _stub_missing_modules(args[0])
                status = zoo.main(args)
            else:
                import optuna.cli

                if parse_only:
                    optuna.cli._get_parser()[0].parse_args(args)
                sys.argv = ["optuna", *args]
                status = optuna.cli.main()
    except _Parsed:
        return 0, ""
    except SystemExit as error:
        status = error.code if isinstance(error.code, int) else 1
    except Exception:
        return 1, stderr.getvalue() + traceback.format_exc()
    return status, stderr.getvalue()[-5000:]


def _child(kind: str, commands_file: str, results_file: str) -> None:
    import os

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # enjoy renders to a window
    results: list[tuple[int, str]] = []
    for program, args in json.loads(Path(commands_file).read_text()):
        results.append(_run_program(program, args, parse_only=kind == "parse"))
        if kind == "run" and results[-1][0] != 0:
            break
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    _child(*sys.argv[1:])
