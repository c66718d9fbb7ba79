"""Every option of every `reco-lab` command says what it does (`--help`), and the commands' errors are one line."""

import argparse
import importlib
from unittest import mock

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
