"""``hpsgd`` / ``python -m lightning_hpsgd``: LightningCLI with the HPSGD strategies registered.

Everything LightningCLI does works: ``fit``, ``validate``, ``test``, ``predict``, ``--config``, ``--print_config``
and dotted overrides. ``hpsgd plot RUN_DIR ...`` draws charts from CSV logs ([`lightning_hpsgd.plot`][]), and
``hpsgd dashboard --entity E`` creates the W&B comparison workspace ([`lightning_hpsgd.wandb`][]).
Importing this package first is what makes ``trainer.strategy: hpsgd`` valid by name.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_hpsgd  # noqa: F401  (registers the strategy names before the Trainer is built)
from lightning_hpsgd.errors import HPSGDError
from lightning_hpsgd.extras import MissingExtraError
from lightning_hpsgd.options import resolve_comm_dtype, validate_launch, validate_options
from lightning_hpsgd.strategy import REGISTERED_NAMES
from lightning_hpsgd.wandb import dashboard_main, offline_unless_logged_in

RECIPES_DIR = Path(lightning_hpsgd.__file__).resolve().parent.parent / "recipes"

TOP_LEVEL_HELP = """\
usage: hpsgd {{fit,validate,test,predict,plot,dashboard}} [options]

Train any LightningModule with HPSGD (Hierarchical Parallel SGD): each worker trains its own replica while the
average of the workers' changes travels over the network, so communication hides behind compute. This is
LightningCLI with HPSGD's strategies registered, so --trainer.strategy hpsgd works in a YAML recipe or on the
command line. Strategy names: {names},
and the baseline localsgd.

subcommands:
  fit         train (LightningCLI: --config RECIPE.yaml, dotted overrides such as --trainer.max_epochs 5)
  validate    validate a model (from a checkpoint with --ckpt_path)
  test        test a model
  predict     predict with a model
  plot        PNG charts from CSV logs: accuracy against wall time, wait and communication per round
  dashboard   create the W&B comparison workspace for logged runs

recipes ({recipes}):
{recipe_list}

examples:
  hpsgd fit --config recipes/mnist1d.yaml --trainer.strategy.sync_every 2
  hpsgd fit --config recipes/mnist1d.yaml --print_config     # the whole configuration, every option
  hpsgd plot lightning_logs/mnist1d_hpsgd --out plots

Each subcommand has its own --help. Errors print one line; HPSGD_DEBUG=1 shows the traceback (or the whole usage).
"""


class UsageError(Exception):
    """A command line the ``hpsgd`` command refuses before it starts: one line, no traceback."""


def top_level_help() -> str:
    """What ``hpsgd --help`` prints: the command, every subcommand, the recipes folder and examples."""
    recipes = sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    return TOP_LEVEL_HELP.format(
        names=", ".join(REGISTERED_NAMES),
        recipes=RECIPES_DIR if recipes else "the recipes/ folder of the lightning-hpsgd repository",
        recipe_list=textwrap.fill(
            ", ".join(recipes) or "(not found next to this installation)",
            width=110,
            initial_indent="  ",
            subsequent_indent="  ",
        ),  # fmt: skip
    )


def check_command_line(args: Sequence[str]) -> None:
    """Refuse, in one line each, the mistakes that LightningCLI reports in a page of usage or traceback.

    Checks the ``--config`` file, the strategy name, and the values of the strategy's options (``sync_every``,
    ``merge``, ``comm_dtype``, ``timeout``, ...), from the command line and from the ``--config`` YAML.

    Raises:
        UsageError: naming what was wrong, the value received and the fix.
    """
    values = _option_values(args)
    strategy_options: dict[str, Any] = {}
    for config in values.get("--config", []) + values.get("-c", []):
        path = Path(config)
        if not path.is_file():
            raise UsageError(_missing_config(path))
        strategy = _yaml_strategy(path)
        if isinstance(strategy, str):
            _check_strategy_name(strategy)
        elif isinstance(strategy, dict):
            strategy_options.update(strategy.get("init_args") or {})
    for name in values.get("--trainer.strategy", []):
        _check_strategy_name(name)
    for key in (*_CHECKED_OPTIONS, *_LAUNCH_OPTIONS):
        for value in values.get(f"--trainer.strategy.{key}", []):
            strategy_options[key] = _parse_value(value)
    options = {key: strategy_options[key] for key in _CHECKED_OPTIONS if key in strategy_options}
    timeout = strategy_options.get("timeout")
    try:
        validate_options(options.pop("sync_every", 1), options.pop("merge", "replica"), **options)
        resolve_comm_dtype(strategy_options.get("comm_dtype"))
        # A number of seconds; strings ("0:30:00") are timedeltas that jsonargparse reads and checks.
        validate_launch(strategy_options.get("start_method", "popen"), None if isinstance(timeout, str) else timeout)
    except ValueError as err:
        raise UsageError(f"--trainer.strategy.{str(err).split(' ', 1)[0]}: {err}") from None


def _option_values(args: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, arg in enumerate(args):
        if "=" in arg and arg.startswith("-"):
            key, value = arg.split("=", 1)
            out.setdefault(key, []).append(value)
        elif arg.startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.setdefault(arg, []).append(args[i + 1])
    return out


_CHECKED_OPTIONS = (
    "sync_every",
    "merge",
    "max_sync_every",
    "outer_lr",
    "outer_momentum",
    "outer_nesterov",
    "hierarchy",
    "sync_delay",
    "fragments",
)
_LAUNCH_OPTIONS = ("comm_dtype", "timeout", "start_method")  # checked by resolve_comm_dtype and validate_launch


def _jsonargparse_load(text: str) -> Any:
    """``text`` (a command-line value or a ``--config`` file) read by the YAML loader LightningCLI parses with.

    That is jsonargparse's loader, not ``yaml.safe_load``: PyYAML follows YAML 1.1, where a float needs a dot, so it
    reads ``1e-3`` as the string ``'1e-3'``; jsonargparse's loader reads a float, as LightningCLI does. Raises
    ``yaml.YAMLError`` for text that is not YAML.
    """
    try:
        from jsonargparse import get_loader  # public in recent jsonargparse
    except ImportError:  # older releases that pyproject.toml allows (4.27.7, 4.28) keep it in a private module only
        from jsonargparse._loaders_dumpers import loaders

        return loaders["yaml"](text)
    return get_loader("yaml")(text)


def _parse_value(value: str) -> Any:
    """A command-line value as jsonargparse reads it (``4`` an int, ``0.9`` and ``1e-3`` floats, ``true`` a bool)."""
    try:
        return _jsonargparse_load(value)
    except yaml.YAMLError:
        return value


def _missing_config(path: Path) -> str:
    here = sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    names = [p.name for p in here]
    close = difflib.get_close_matches(path.name, names, n=1)
    hint = f" Did you mean {RECIPES_DIR.name}/{close[0]}?" if close else ""
    listing = f" Recipes in {RECIPES_DIR}: {', '.join(names)}." if names else ""
    return f"--config: no such file: {str(path)!r}.{hint}{listing}"


def _yaml_strategy(path: Path) -> Any:
    try:
        loaded = _jsonargparse_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # LightningCLI reports what is wrong with the file
    trainer = loaded.get("trainer") if isinstance(loaded, dict) else None
    return trainer.get("strategy") if isinstance(trainer, dict) else None


def _check_strategy_name(name: str) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "." in name or name in StrategyRegistry:
        return
    known = sorted(StrategyRegistry.available_strategies())
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    hpsgd = ", ".join(REGISTERED_NAMES)
    raise UsageError(
        f"--trainer.strategy: unknown strategy {name!r}.{hint} HPSGD's names: {hpsgd}; Lightning's include ddp,"
        " ddp_spawn, fsdp, auto (or give a class path such as lightning_hpsgd.HPSGDStrategy)."
    )


def expand_strategy_names(args: Sequence[str]) -> list[str]:
    """Rewrite ``--trainer.strategy hpsgd`` into its ``class_path`` form when strategy options follow it.

    jsonargparse cannot attach ``--trainer.strategy.sync_every 4`` to a plain string, so
    ``--trainer.strategy hpsgd --trainer.strategy.sync_every 4`` becomes
    ``--trainer.strategy lightning_hpsgd.HPSGDStrategy --trainer.strategy.start_method popen ...
    --trainer.strategy.sync_every 4``. Without strategy options after it, a name stays a name.
    """
    args = list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = None
        if arg == "--trainer.strategy" and i + 1 < len(args):
            name, step = args[i + 1], 2
        elif arg.startswith("--trainer.strategy="):
            name, step = arg.split("=", 1)[1], 1
        if arg == "--trainer.strategy.help" and i + 1 < len(args) and args[i + 1] in REGISTERED_NAMES:
            out += [arg, "lightning_hpsgd.HPSGDStrategy"]  # help on a registered name: its class
            i += 2
            continue
        has_options = any(a.startswith("--trainer.strategy.") for a in args[i + 1 :])
        if name in REGISTERED_NAMES and has_options:
            out += ["--trainer.strategy", "lightning_hpsgd.HPSGDStrategy"]
            for key, value in REGISTERED_NAMES[name].items():
                out += [f"--trainer.strategy.{key}", value]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


class HPSGDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors end in one line instead of the usage and jsonargparse's internals.

    The line names the option, the closest valid name for a misspelled one (``--trainer.max_epoch``,
    ``--trainer.strategy.sync_evry``, ``sync_evry:`` under ``init_args`` in a ``--config`` file), or the expected
    type and the value received. ``HPSGD_DEBUG=1`` prints jsonargparse's whole message and the usage instead.
    """

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or _debug():  # jsonargparse's inner parsers raise, and their callers report
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self  # a subcommand's options, checked by the command
        args = list(getattr(self, "args", None) or sys.argv[1:])
        self.exit(2, f"hpsgd: error: {parse_error_line(message, parser, args)}\n")


def _debug() -> bool:
    return os.environ.get("HPSGD_DEBUG", "") not in ("", "0")


_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.DOTALL)
_INVALID_CHOICE = re.compile(r"argument (\w+): invalid choice: '([^']*)' \(choose from (.*)\)")
_NOT_IN_PARSER = re.compile(
    r"(?:Subcommand '[^']+' does not accept option|Group '([^']+)' does not accept option|Option)"
    r" '([^']+)'"
)
_NOT_IN_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s+Option '([^']+)' is not accepted")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN_VALUE = re.compile(r"Given value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_NESTED_ARG = re.compile(r"NestedArg\(key='([^']*)', val='([^']*)'\)")


def parse_error_line(message: str, parser: ArgumentParser, args: Sequence[str]) -> str:
    """jsonargparse's error ``message`` in one line: the option, and the closest valid name or the expected type.

    Args:
        message: what jsonargparse prints after ``error:`` (often many lines).
        parser: the parser whose options were wrong: a subcommand's (``hpsgd [options] fit``) or the command's.
        args: the command line it parsed, to tell an option given there from one in a ``--config`` file.
    """
    subcommands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    parser = next((subcommands[a] for a in args if a in subcommands), parser)
    command = parser.prog.replace(" [options]", "")
    configs = [*_option_values(args).get("--config", []), *_option_values(args).get("-c", [])]
    in_config = f" (in {configs[0]})" if len(configs) == 1 else " (in a --config file)"
    see_help = f"`{command} --help` lists every option."
    if match := _UNRECOGNIZED.fullmatch(message.strip()):
        words = [w for w in match.group(1).split() if w not in subcommands]
        options = [w.split("=", 1)[0] for w in words if re.match(r"--?[A-Za-z]", w)]
        if not options:
            return f"unexpected argument {(words or [''])[0]!r}. {see_help}"
        return _no_such_option(options[0], [n for a in parser._actions for n in a.option_strings], see_help)
    if match := _INVALID_CHOICE.fullmatch(message.strip()):
        name, value, choices = match.groups()
        close = difflib.get_close_matches(value, re.findall(r"'([^']*)'", choices), n=1)
        return f"{name}: no {name} {value!r}. " + (f"Did you mean {close[0]}?" if close else f"Choose from {choices}.")
    if match := _NOT_IN_CLASS.search(message):
        class_path, option = match.groups()
        group = _PARSER_KEY.findall(message[: match.start()])[0]
        see_class = f"`{command} --{group}.help {class_path}` lists its options."
        flag = f"--{group}.{option}"
        if any(a.split("=", 1)[0] in (flag, f"--{group}.init_args.{option}") for a in args):
            valid = [f"--{group}.{name}" for name in _init_arg_names(class_path)]
            return _no_such_option(flag, valid, see_class, of=f" of {class_path}")
        return _no_such_option(
            option, _init_arg_names(class_path), see_class, of=f" of {class_path}", where=in_config,
            name=f"{group}.init_args.{option}",
        )  # fmt: skip
    if match := _NOT_IN_PARSER.search(message):
        group, option = match.groups()
        key = f"{group}.{option}" if group else option
        where = "" if any(a.split("=", 1)[0] == f"--{key}" for a in args) else in_config  # before the subcommand
        return _no_such_option(key, [a.dest for a in parser._actions], see_help, where=where)
    if keys := _PARSER_KEY.findall(message):
        innermost = message[message.rindex("Parser key") :]  # the nested option's own types and value
        given, subtypes = _GIVEN_VALUE.search(innermost), _SUBTYPES.search(innermost)
        if given and subtypes:
            received = _NESTED_ARG.sub(r"\1=\2", given.group(1))
            expected = _type_names(subtypes.group(1))
            return f"--{'.'.join(keys)}: expected {expected}; received {received!r}. `{command} --help` describes it."
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return f"{first} (`{command} --help` lists the options; HPSGD_DEBUG=1 prints the parser's whole message)"


def _no_such_option(
    key: str, valid: Sequence[str], see_help: str, *, of: str = "", where: str = "", name: str | None = None
) -> str:
    """``NAME WHERE: no such option OF. Did you mean CLOSEST?``, or ``SEE_HELP`` when no valid name is close.

    ``key`` is compared with the ``valid`` names by its last dotted part (difflib's ratio, or one starting the
    other), first among the names of its own group (``--trainer.max_epoch`` with ``--trainer.*``), then among all
    (``--max_epochs`` finds ``--trainer.max_epochs``).
    """
    group, _, leaf = key.rpartition(".")
    valid = [v for v in valid if v.lstrip("-") not in ("help", "h")]
    for pool in ([v for v in valid if v.rpartition(".")[0] == group], valid):
        by_leaf = {v.rpartition(".")[2].lstrip("-"): v for v in reversed(pool)}
        typed = leaf.lstrip("-")
        close = difflib.get_close_matches(typed, list(by_leaf), n=1) or sorted(
            (v for v in by_leaf if len(v) > 1 and (typed.startswith(v) or v.startswith(typed))), key=len, reverse=True
        )  # a name with a suffix too many or too few: lr_typo, max_epoch
        if close:
            return f"{name or key}{where}: no such option{of}. Did you mean {by_leaf[close[0]]}?"
    return f"{name or key}{where}: no such option{of}. {see_help}"


def _init_arg_names(class_path: str) -> list[str]:
    """The options LightningCLI accepts under ``init_args`` for ``class_path`` (none if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
    except Exception:  # noqa: BLE001  (a suggestion is a nicety: without one, the line points at --help)
        return []
    return sorted({action.dest.split(".", 1)[0] for action in parser._actions} - {"help"})


def _type_names(subtypes: str) -> str:
    """``<class 'int'>, <class 'NoneType'>`` (a Union's members, as jsonargparse lists them) as ``int or None``."""
    names = [re.sub(r"^<class '(?:\w+\.)*(\w+)'>$", r"\1", t.strip()) for t in re.split(r",\s*(?![^\[]*\])", subtypes)]
    names = ["None" if n == "NoneType" else n for n in names]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


class HPSGDCLI(LightningCLI):
    """LightningCLI whose ``args`` also accept ``--trainer.strategy hpsgd --trainer.strategy.<option> ...``.

    Defaults differ from LightningCLI's in two ways: the saved ``config.yaml`` may overwrite an earlier one, so a
    recipe can be run twice in the same directory; and without a W&B API key (and no ``WANDB_MODE``) W&B runs are
    written offline ([`lightning_hpsgd.wandb.offline_unless_logged_in`][]).
    """

    def __init__(self, *args, **kwargs) -> None:
        offline_unless_logged_in()
        kwargs.setdefault("parser_kwargs", {"prog": "hpsgd"})
        kwargs.setdefault("parser_class", HPSGDArgumentParser)
        if isinstance(kwargs.get("args"), (list, tuple)):
            kwargs["args"] = expand_strategy_names(kwargs["args"])
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser of the command and of each subcommand: no prefix matching, so that ``--trainer.max_epoch 2``
        is refused as a typo rather than taken as ``--trainer.max_epochs 2``."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``hpsgd`` console script and of ``python -m lightning_hpsgd``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["plot"]:
        from lightning_hpsgd.plot import main as plot_main

        plot_main(argv[1:])
        return
    if argv[:1] == ["dashboard"]:
        dashboard_main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return
    try:
        check_command_line(argv)
    except UsageError as err:
        raise SystemExit(f"hpsgd: error: {err}") from None
    try:
        _run(args)
    except MissingExtraError as err:  # a recipe's package (mnist1d, torchvision) is not installed
        raise SystemExit(f"hpsgd: error: {err}") from None
    except (ValueError, HPSGDError) as err:
        # HPSGD's own errors (bad options, faults) are for the user: one line. A ValueError from anywhere else (the
        # user's module, a library) may be a bug, and keeps its traceback.
        if _debug() or not (isinstance(err, HPSGDError) or _raised_by_this_package(err)):
            raise
        raise SystemExit(f"hpsgd: error: {err}\n(HPSGD_DEBUG=1 shows the traceback)") from None


def _raised_by_this_package(err: BaseException) -> bool:
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    package = Path(lightning_hpsgd.__file__).resolve().parent
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def _run(args: Sequence[str] | None) -> None:
    if args is None:
        # Rewritten in place, so that Lightning's popen launcher re-runs the same (expanded) command per rank.
        sys.argv[1:] = expand_strategy_names(sys.argv[1:])
        HPSGDCLI()
    else:
        HPSGDCLI(args=list(args))
    if args is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # The command ends here: end the process group as PyTorch asks, so that no collective's resources are
        # freed by gloo's threads during interpreter shutdown (which aborts the process).
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
