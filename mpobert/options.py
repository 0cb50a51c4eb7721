"""Settings dataclasses that document themselves, and the command-line options generated from them.

A settings class (:class:`~mpobert.train.TrainConfig`, the workflow configs of
:mod:`mpobert.workflows`) declares each field with :func:`option` (default, help text, choices)
or, for a nested settings object, :func:`nested`. :func:`add_options` turns the fields into
``argparse`` options (``max_steps`` -> ``--max-steps``) and :func:`from_namespace` builds the
object back from the parsed namespace, so every option is written once, on its field.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["option", "nested", "add_options", "from_namespace", "flag_of"]

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None,
           flag: str | None = None) -> Any:
    """A dataclass field documented for the command line.

    Parameters
    ----------
    default : optional
        The default; without one the field is required (use ``kw_only`` dataclasses).
    help : str
        The option's help text (the default is appended to it).
    choices : tuple of str, optional
        Allowed values.
    flag : str, optional
        The option's spelling when not ``--field-name`` (e.g. ``--from`` for ``source``).
    """
    if not help:
        raise ValueError("option() needs a help text")
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type, help: str, required: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A field holding a settings object ``cls(**defaults)``, whose options form one group titled ``help``.

    ``required`` names fields of ``cls`` that the command line must give even though ``cls``
    has defaults for them (e.g. ``output_dir`` of a training run).
    """
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"help": help, "required": tuple(required), "nested": True})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of field ``f``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(tp: Any) -> tuple[Any, bool]:
    """``(element type, is_list)`` of an annotation such as ``int``, ``float | None``, ``list[str] | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported option type {tp}")
        tp = members[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_options(parser: Any, cls: type,
                defaults: Any = None, required: tuple[str, ...] = ()) -> set[str]:
    """Add an option for every field of settings class ``cls`` to ``parser`` (an ``ArgumentParser``
    or argument group); returns their ``dest`` names.

    Nested settings (:func:`nested`) get an argument group of their own. ``defaults`` (an
    instance of ``cls``) overrides the class defaults; ``required`` fields have no default.
    Required options are checked by :func:`from_namespace`, not by ``argparse``, so a config
    file may supply them (``parser.set_defaults``).
    """
    hints = typing.get_type_hints(cls)
    dests: set[str] = set()
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option() or nested()")
        if f.metadata.get("nested"):
            group = parser.add_argument_group(f.metadata["help"])
            dests |= add_options(group, hints[f.name], f.default_factory(), f.metadata["required"])
            continue
        must = _is_required(f) or f.name in required
        default = None if must else (getattr(defaults, f.name) if defaults is not None else
                                     f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        tp, is_list = _value_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            if default:
                kwargs["help"] += " (default: on)"
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
            if is_list:
                kwargs["nargs"] = "+"
            if f.metadata.get("choices"):
                kwargs.update(choices=f.metadata["choices"], metavar=None)
            kwargs["help"] += " (required)" if must else "" if default is None else " (default: %(default)s)"
        parser.add_argument(flag_of(f), **kwargs)
        dests.add(f.name)
    return dests


def from_namespace(cls: type[T], namespace: argparse.Namespace, required: tuple[str, ...] = ()) -> T:
    """Build settings class ``cls`` (and its nested settings) from a namespace of :func:`add_options`.

    Raises ``ValueError`` naming the option when a required one is missing.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            values[f.name] = from_namespace(hints[f.name], namespace, f.metadata["required"])
            continue
        value = getattr(namespace, f.name)
        if value is None and (_is_required(f) or f.name in required):
            raise ValueError(f"the option {flag_of(f)} is required")
        if value is not None or f.default is None:
            values[f.name] = value
    return cls(**values)
