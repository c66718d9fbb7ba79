"""Every option of every `reco-lab` command says what it does (`--help`), and the commands' errors are one line."""

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from reco_lab.cli import DELEGATED, build_parser


def all_parsers() -> list[argparse.ArgumentParser]:
    "Every parser `reco-lab` builds: its own, each delegated command's, and their subcommands'."
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        for module, func, _ in DELEGATED.values():
            try:
                getattr(importlib.import_module(module), func)([])
            except SystemExit:
                pass
    found, stack = [], [build_parser(), *seen]
    while stack:
        parser = stack.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return found


def test_every_option_of_every_command_has_a_help_text():
    parsers = all_parsers()
    assert len(parsers) >= 12, [p.prog for p in parsers]  # reco-lab, its commands and their subcommands
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in parsers
        for a in p._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert not missing, f"options without a help text: {missing}"
    undescribed = [p.prog for p in parsers if p.add_help and not p.description and p.prog != "reco-lab"]
    assert not undescribed, f"commands without a description: {undescribed}"


# --- report writers never write an empty or foreign study over the reports -----------------------------------------


def leaderboard(tmp_path: Path, uri: str | None) -> subprocess.CompletedProcess:
    "`reco-lab leaderboard` into a reports folder holding a committed-looking leaderboard, with `uri` as the store."
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RECO_LAB_HOME"] = str(tmp_path / "home")  # the embedded default store would be under it
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [str(Path(sys.executable).with_name("reco-lab")), "leaderboard", "--reports-dir", str(tmp_path / "reports")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def committed(tmp_path) -> dict[str, str]:
    reports = tmp_path / "reports"
    reports.mkdir()
    files = {"leaderboard.md": "| model | test MAP@10 |\n| knn | 0.06 |\n", "leaderboard.csv": "model\nknn\n"}
    files["index.html"] = "<html>the committed index</html>"
    for name, text in files.items():
        (reports / name).write_text(text)
    return files


def untouched(tmp_path: Path, files: dict[str, str]) -> bool:
    return {p.name: p.read_text() for p in (tmp_path / "reports").iterdir()} == files


@pytest.mark.parametrize(
    "store, said",
    [
        (None, "no MLflow store at"),  # the embedded default, never created by a study here
        ("sqlite:///{tmp}/typo/mlflow.db", "no MLflow store at"),  # a mistyped path
        ("bogus://nowhere", "does not answer"),  # a URI MLflow cannot read
    ],
)
def test_leaderboard_without_a_store_says_so_and_writes_nothing(tmp_path, committed, store, said):
    done = leaderboard(tmp_path, store.format(tmp=tmp_path) if store else None)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert untouched(tmp_path, committed)
    assert not (tmp_path / "home").exists() and not (tmp_path / "typo").exists()  # no store was created


def test_leaderboard_of_a_store_without_a_study_writes_nothing(tmp_path, committed):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    from mlflow import MlflowClient

    MlflowClient(uri).create_experiment("study")  # a store that answers and holds no finished study
    done = leaderboard(tmp_path, uri)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "no finished" in done.stderr.lower() or "no run" in done.stderr.lower(), done.stderr
    assert untouched(tmp_path, committed)
