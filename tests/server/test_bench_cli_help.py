"""Every ``loraserve bench`` option, in every subcommand, says what it is for in ``--help``;
so does every option of the comparisons with the baselines in ``benchmarks/``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from benchmarks import compare, sweep_baselines
from server.bench.cli import add_bench_parser


def _parsers(
    parser: argparse.ArgumentParser, prog: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser below it, with the command that reaches it."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_bench_option_has_help() -> None:
    root = argparse.ArgumentParser(prog="loraserve")
    add_bench_parser(root.add_subparsers(dest="command"))
    (bench,) = (
        a.choices["bench"] for a in root._actions if isinstance(a, argparse._SubParsersAction)
    )
    found = dict(_parsers(bench, "loraserve bench"))
    for command in ("serve", "sweep", "prefix", "fairness", "make-adapters"):
        assert f"loraserve bench {command}" in found
    for script in (compare.parser(), sweep_baselines.parser()):
        found.update(_parsers(script, script.prog))
    missing = []
    for prog, parser in found.items():
        parser.format_help()  # renders: no stray % in a help string
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                # each subcommand's one-line help in the parent's listing
                missing += [
                    f"{prog} {choice.dest}"
                    for choice in action._choices_actions
                    if not (choice.help or "").strip()
                ]
                continue
            if not action.option_strings:
                continue
            text = action.help
            if not isinstance(text, str) or not text.strip() or text == argparse.SUPPRESS:
                missing.append(f"{prog} {'/'.join(action.option_strings)}")
    assert not missing, f"options without help: {missing}"
