"""Command line of MPOBERT: ``python -m mpobert {pretrain,finetune,evaluate,convert,params,demo,distill,heal}``.

This module only parses: each subcommand is a workflow of :mod:`mpobert.workflows` whose
options are generated from its settings dataclass (:func:`mpobert.options.add_options`; the
training options from :class:`~mpobert.train.TrainConfig`'s fields).

Every subcommand takes ``--config FILE`` (JSON, or YAML when PyYAML is installed): its keys
are the subcommand's long options (``max_steps`` or ``max-steps``) and become defaults that
explicit command-line options override. Run ``python -m mpobert <command> --help`` for the
options of each. Under ``torchrun`` (``pretrain``/``finetune``) each process trains one
data-parallel rank (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpobert import workflows
from mpobert.options import add_options, from_namespace
from mpobert.train import NonFiniteLossError

__all__ = ["COMMANDS", "Command", "load_config_file", "build_parser", "parse_args", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: the workflow it runs and the settings class its options come from."""

    run: Callable[[Any], dict[str, Any]]
    settings: type


COMMANDS = {
    "pretrain": Command(workflows.pretrain, workflows.PretrainConfig),
    "finetune": Command(workflows.finetune, workflows.FinetuneConfig),
    "evaluate": Command(workflows.evaluate, workflows.EvaluateConfig),
    "convert": Command(workflows.convert, workflows.ConvertConfig),
    "params": Command(workflows.params, workflows.ParamsConfig),
    "demo": Command(workflows.demo, workflows.DemoConfig),
    "distill": Command(workflows.distill, workflows.DistillConfig),
    "heal": Command(workflows.heal, workflows.HealConfig),
}
"""The subcommands of ``python -m mpobert``; a new one is a workflow + settings class and a line here."""


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a JSON (or, with PyYAML, YAML) file as a flat dict."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path!r} is YAML but PyYAML is not installed (use JSON)") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values")
    return data


def _build() -> tuple[argparse.ArgumentParser, dict[str, tuple[argparse.ArgumentParser, set[str]]]]:
    """The parser and, per subcommand, its parser and option ``dest`` names."""
    parser = argparse.ArgumentParser(prog="mpobert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    subs = {}
    for name, command in COMMANDS.items():
        doc = command.run.__doc__
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        p.add_argument("--config", help="JSON (or YAML) file of option defaults, e.g. {\"max_steps\": 300}")
        subs[name] = (p, add_options(p, command.settings))
    return parser, subs


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mpobert`` argument parser."""
    return _build()[0]


def parse_args(argv: Sequence[str] | None = None) -> tuple[Command, Any]:
    """Parse ``argv`` into ``(command, settings object)``, taking option defaults from ``--config``
    when given (the command line wins). Raises ``ValueError`` for a bad config file or a missing
    required option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _build()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if config and argv and argv[0] in subs:
        sub, dests = subs[argv[0]]
        values = {str(k).replace("-", "_"): v for k, v in load_config_file(config).items()}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise ValueError(f"--config {config!r}: unknown options for {argv[0]}: {unknown}")
        sub.set_defaults(**values)
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    return command, from_namespace(command.settings, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mpobert`` and the ``mpobert`` console script."""
    try:
        command, settings = parse_args(argv)
        command.run(settings)
    except ValueError as exc:
        print(f"mpobert: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"mpobert: training stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
