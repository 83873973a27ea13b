"""Command lines generated from Options dataclasses (the idea of transformers' HfArgumentParser).

Each field becomes one flag (`--field-name`) with the field's default, a type from its annotation and the help
text, choices or flag name given by `cli(...)` in its metadata; a bool field that defaults to True becomes
`--no-field-name`. A field holding a dataclass (FinetuneOptions.selora: a SeLoRAConfig) contributes the
sub-fields its `cli(nested=...)` lists. `parse_options` turns the parsed arguments back into the dataclass,
so programs never copy fields one by one. `report_user_errors` runs a program's work and turns a user error
into `error: <message>` on stderr and exit status 2 (the status argparse uses for usage errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ..training.checkpoints import OutputFolderBusy

CLI_KEY = "cli"
# Errors a user can fix (a path, a file's content, a value): their message says what to change, so a traceback
# would only bury it. Other exception types keep their traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, OutputFolderBusy)
USAGE_ERROR_STATUS = 2


def report_user_errors(work: Callable[[], int], errors: Tuple[type, ...] = USER_ERRORS) -> int:
    """`work()`'s exit status; one of `errors` is printed as `error: <message>` on stderr and gives 2."""
    try:
        return work()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR_STATUS


def cli(help: str = "", *, flag: Optional[str] = None, choices: Optional[Sequence] = None,
        type: Optional[Callable[[str], Any]] = None, nargs: Optional[str] = None,
        convert: Optional[Callable[[Any], Any]] = None, hidden: bool = False,
        nested: Optional[Dict[str, dict]] = None) -> dict:
    """Field metadata for options_parser: `field(default=..., metadata=cli("help", ...))`.

    flag: the option's name (default `--<field-name>`); type / nargs: override what the annotation implies;
    convert: applied to the parsed value before it goes into the dataclass; hidden: no flag (the default is
    kept); nested: for a dataclass-valued field, sub-field name -> cli(...) of the sub-fields to expose."""
    return {CLI_KEY: {"help": help, "flag": flag, "choices": choices, "type": type, "nargs": nargs,
                      "convert": convert, "hidden": hidden, "nested": nested}}


def _spec(metadata) -> dict:
    return metadata.get(CLI_KEY) or cli()[CLI_KEY]


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argument(name: str, annotation, default, spec: dict) -> Tuple[Tuple[str, ...], dict]:
    """The flags and add_argument keywords of one (sub-)field."""
    flag = spec["flag"] or "--" + name.rsplit(".", 1)[-1].replace("_", "-")
    # ArgumentDefaultsHelpFormatter adds the default to help texts; a flag without one still shows it
    kwargs = {"dest": name, "default": default, "help": spec["help"] or "(default: %(default)s)"}
    annotation = _unwrap_optional(annotation)
    if annotation is bool and spec["type"] is None:
        if default:
            flag = spec["flag"] or "--no-" + name.rsplit(".", 1)[-1].replace("_", "-")
            kwargs.update(action="store_false", help=spec["help"] or None)
        else:
            kwargs.update(action="store_true", help=spec["help"] or None)
        return (flag,), kwargs
    origin = typing.get_origin(annotation) or (annotation if annotation in (list, tuple) else None)
    value_type, nargs = spec["type"], spec["nargs"]
    if origin in (list, tuple, typing.get_origin(Sequence)) and spec["type"] is None:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        value_type, nargs = (args[0] if args else str), nargs or "+"
    elif value_type is None:
        if annotation not in (int, float, str):
            raise TypeError(f"options_parser: field {name!r} ({annotation!r}) has no command-line form; give it "
                            f"cli(type=...) or cli(hidden=True)")
        value_type = annotation
    kwargs["type"] = value_type
    if nargs is not None:
        kwargs["nargs"] = nargs
    if spec["choices"] is not None:
        kwargs["choices"] = list(spec["choices"])
    else:  # the flag's name, not the dotted dest of a nested field
        kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    return (flag,), kwargs


def _fields(options_cls):
    """(dotted name, annotation, default, cli spec) of every exposed field, nested sub-fields flattened."""
    hints = typing.get_type_hints(options_cls)
    defaults = options_cls()
    for f in dataclasses.fields(options_cls):
        spec = _spec(f.metadata)
        if spec["hidden"]:
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            sub_hints = typing.get_type_hints(hints[f.name])
            for sub_name, sub_spec in (spec["nested"] or {}).items():
                yield (f"{f.name}.{sub_name}", sub_hints[sub_name], getattr(default, sub_name),
                       {**cli()[CLI_KEY], **sub_spec[CLI_KEY]})
            continue
        yield f.name, hints[f.name], default, spec


def options_parser(options_cls, prog: Optional[str] = None, description: Optional[str] = None,
                   epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass `options_cls` (every field needs a default)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, annotation, default, spec in _fields(options_cls):
        flags, kwargs = _argument(name, annotation, default, spec)
        parser.add_argument(*flags, **kwargs)
    return parser


def _converted(value, annotation, spec: dict):
    if spec["convert"] is not None:
        return spec["convert"](value)
    origin = typing.get_origin(_unwrap_optional(annotation))
    if origin in (tuple, typing.get_origin(Sequence)) and isinstance(value, list):
        return tuple(value)
    return value


def _replaced(instance, changes: dict):
    """dataclasses.replace without its InitVar pitfall: replace reads every InitVar back from the instance,
    which fails for an InitVar kept only as an __init__ argument (SeLoRAConfig's old argument names)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.init}
    return type(instance)(**{**values, **changes})


def parse_options(options_cls, argv=None, parser: Optional[argparse.ArgumentParser] = None):
    """The dataclass `options_cls` from the command line `argv` (None: sys.argv[1:]); fields without a flag
    keep their defaults. Errors raised by the dataclass (its validation) are reported as usage errors."""
    parser = parser or options_parser(options_cls)
    values = vars(parser.parse_args(argv))
    top, nested = {}, {}
    for name, annotation, _, spec in _fields(options_cls):
        value = _converted(values[name], annotation, spec)
        if "." in name:
            field_name, sub_name = name.split(".", 1)
            nested.setdefault(field_name, {})[sub_name] = value
        else:
            top[name] = value
    try:
        defaults = options_cls()
        for field_name, sub_values in nested.items():
            top[field_name] = _replaced(getattr(defaults, field_name), sub_values)
        return options_cls(**top)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
