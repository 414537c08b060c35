"""A CLI that explains itself: every flag of every subcommand has a one-line help with its default and allowed
values, generated from the config fields' metadata, and the README's option table is that same text."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sib.cli import build_parser
from sib.config import EvalConfig, ExplainConfig, TrainConfig, options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG_COMMANDS = {"train": TrainConfig, "evaluate": EvalConfig, "explain": ExplainConfig}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand ("train", "data check", ...) and its parser, walked from the top parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return found


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """The one-line help of every subcommand (as `sib --help` lists them), sub-sub-commands included."""
    helps: dict[str, str | None] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                helps[choice.dest] = choice.help
            for sub in action.choices.values():
                helps.update(_subcommand_help(sub))
    return helps


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_is_walked():
    commands = _commands(build_parser())
    # the list; a subcommand added later (e.g. `report`) is covered by the tests below automatically
    assert {"train", "evaluate", "explain", "study", "demo", "data check"} <= set(commands)
    assert all(isinstance(h, str) and h.strip() for h in _subcommand_help(build_parser()).values())


@pytest.mark.parametrize("command", sorted(_commands(build_parser())))
def test_every_flag_has_a_one_line_help(command):
    parser = _commands(build_parser())[command]
    flags = _flags(parser)
    assert flags, command
    for action in flags:
        name = "/".join(action.option_strings) or action.dest
        assert isinstance(action.help, str) and action.help.strip() and action.help != argparse.SUPPRESS, \
            f"sib {command} {name}: no help text"
        assert "\n" not in action.help, f"sib {command} {name}: help is not one line"
    text = parser.format_help()  # expands %(default)s etc.: a stray % would raise here
    for action in flags:
        for option in action.option_strings:
            assert option in text


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_config_flags_state_their_default_and_come_from_the_fields(command):
    cls = CONFIG_COMMANDS[command]
    parser = _commands(build_parser())[command]
    by_dest = {a.dest: a for a in _flags(parser)}
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help metadata"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, dict):
            assert f.name not in by_dest  # structured options: YAML only
            continue
        action = by_dest[f.name]
        assert f.metadata["help"] in action.help  # the field's own text, not a copy kept elsewhere
        assert re.search(r"\((default: [^)]+|required)\)", action.help), f"--{f.name}: no default stated"
        plain = isinstance(default, (int, float, str)) and not isinstance(default, bool) and default != ""
        if plain and not f.metadata.get("default_text"):
            assert f"(default: {default})" in action.help, f"--{f.name}: default {default!r} not stated"


def _allowed(help_text: str) -> set[str]:
    found = re.search(r"Allowed: (.*)\.$", help_text)
    assert found, help_text
    return {v.strip() for v in found[1].split(",")}


def test_allowed_values_are_the_registries_names():
    from sib.data import DATASETS
    from sib.data.transforms import NORMALIZATIONS
    from sib.explain import EXPLAINERS
    from sib.metrics import METRICS
    from sib.models import available_models
    from sib.regularizers import REGULARIZERS
    from sib.run_dir import WEIGHTS
    from sib.schedule import SCHEDULES

    commands = _commands(build_parser())
    helps = {(c, a.dest): a.help for c in CONFIG_COMMANDS for a in _flags(commands[c])}
    expected = {
        ("train", "dataset"): set(DATASETS.names()), ("evaluate", "dataset"): set(DATASETS.names()),
        ("train", "model"): set(available_models()), ("train", "regularizer"): set(REGULARIZERS.names()),
        ("train", "normalization"): set(NORMALIZATIONS), ("train", "schedule"): set(SCHEDULES),
        ("train", "amp"): {"none", "bf16", "fp16"}, ("train", "optimizer"): {"adamw", "sgd"},
        ("evaluate", "methods"): {"all", *EXPLAINERS.names()}, ("explain", "methods"): {"all", *EXPLAINERS.names()},
        ("evaluate", "metrics"): {"all", *METRICS.names()},
        ("evaluate", "weights"): set(WEIGHTS), ("explain", "weights"): set(WEIGHTS),
        ("evaluate", "target"): {"label", "pred"},
    }
    for key, values in expected.items():
        assert _allowed(helps[key]) == values, key
    assert "resnet18" in _allowed(helps[("train", "model")]) and "tiny_cnn" in _allowed(helps[("train", "model")])


def test_train_help_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "sib", "train", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--sib-bg-weight" in proc.stdout and "weight of the background term (default: 1000.0)" in " ".join(
        proc.stdout.split())


def _readme_block() -> str:
    text = README.read_text()
    found = re.search(r"<!-- options:start[^>]*-->\n(.*?)<!-- options:end -->", text, re.S)
    assert found, "README.md lacks the <!-- options:start --> ... <!-- options:end --> block"
    return found[1]


def test_readme_option_table_is_the_generated_one():
    """Regenerate with `python -m sib.config --markdown` and paste it between the markers."""
    assert _readme_block() == options_markdown()
    proc = subprocess.run([sys.executable, "-m", "sib.config", "--markdown"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == options_markdown()


def test_readme_table_lists_every_field():
    block = _readme_block()
    for cls in CONFIG_COMMANDS.values():
        for f in dataclasses.fields(cls):
            assert f"`--{f.name.replace('_', '-')}`" in block or f"`{f.name}` (YAML only)" in block, f.name
