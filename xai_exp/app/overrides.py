"""The command line's overrides, checked before Hydra sees them: one line for each problem.

Hydra's own messages for these are several lines (a lexer error, a list of options, an
OmegaConf error with its ``full_key`` / ``reference_type`` block); these name the override,
what is wrong and the fix, with "did you mean" where a name is close to a valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from xai_exp.config import StudyConfig
from xai_exp.track.runs import flatten

GRAMMAR_DOCS = "https://hydra.cc/docs/advanced/override_grammar/basic"
# flags that point Hydra at other config groups: the choices of conf/ then do not apply
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
SPECIAL = ",'\"[]{}()=$\\"  # characters of Hydra's grammar: a value with one is not a plain path


def candidates(args: Sequence[str]) -> list[str]:
    """The arguments that are overrides (``key=value``), not Hydra's flags."""
    return [a for a in args if "=" in a and not a.startswith("-")]


def expand_home(args: Sequence[str]) -> list[str]:
    """`args` with ``key=~/path`` as ``key=/home/me/path``, as a shell expands ``a=~/b``.

    Hydra's grammar rejects an unquoted ``~`` in a value, so no valid override changes
    meaning. An argument is kept as given when the expanded value would not parse as exactly
    that path (a sweep, ``~user`` unknown): its message then says to quote it.
    """
    return [_expanded(arg) if arg in candidates([arg]) else arg for arg in args]


def _expanded(arg: str) -> str:
    key, _, value = arg.partition("=")
    if not value.startswith("~") or any(c in value for c in SPECIAL):
        return arg  # a sweep, a list, quotes: the user writes Hydra's grammar, not a path
    path = os.path.expanduser(value)
    if path == value:
        return arg
    for option in (f"{key}={path}", f"{key}='{path}'"):
        try:
            [override] = OverridesParser.create().parse_overrides([option])
        except HydraException:
            continue
        if override.value_type == ValueType.ELEMENT and override.value() == path:
            return option
    return arg


def grammar_problem(args: Sequence[str]) -> str | None:
    """One line for the first override Hydra's grammar cannot parse."""
    parser = OverridesParser.create()
    for arg in candidates(args):
        try:
            parser.parse_overrides([arg])
        except HydraException as error:
            key, _, value = arg.partition("=")
            if value.startswith("~") or ",~" in value:
                return (
                    f"{arg}: Hydra cannot read an unquoted ~; quote the value "
                    f"('{key}=\"{value}\"') or write $HOME"
                )
            detail = str(error).strip().splitlines()[0]
            return (
                f"cannot read the override {arg!r} ({detail}); quote a value with special "
                f"characters ('{key}=\"...\"'), see {GRAMMAR_DOCS}"
            )
    return None


def known_keys(conf: Path) -> set[str]:
    """Every config group and key an override may name (and their parents)."""
    groups = {p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra"}
    keys = set(flatten(dataclasses.asdict(StudyConfig())))
    parents = {key.rsplit(".", depth)[0] for key in keys for depth in (1, 2) if "." in key}
    return groups | keys | parents


def unknown_key(overrides: Iterable[Override], conf: Path) -> str | None:
    """One line for the first override that names no config group or key, with a suggestion.

    Hydra's own message for a typo (``threshhold=top20``) is several lines and suggests
    adding the key with ``+``; this names the closest valid key instead.
    """
    known = known_keys(conf)
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.is_force_add():
            continue  # the user adds or removes a key on purpose
        if key in known or key.startswith(("hydra.", "hydra/", "lime.segmentation.params.")):
            continue
        if key.startswith("model.kwargs."):  # an open dict, empty in every preset
            return f"{key} is a timm.create_model argument: add it with +{key}=VALUE"
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown config key {key!r}{hint} (xai-exp run --help lists groups and keys)"
    return None


SEGMENTATION_PARAMS = "lime.segmentation.params."


def _plain(override: Override | None) -> str | None:
    """The string an override sets, None when it is a sweep or not a string."""
    if override is None or override.is_sweep_override():
        return None
    value = override.value()
    return value if isinstance(value, str) else None


def unset_superpixel_param(overrides: Sequence[Override], conf: Path) -> str | None:
    """One line for ``lime.segmentation.params.NAME=V`` without ``+`` where the lime preset sets
    no NAME (Hydra's own message is seven lines): the ``+`` to add it, or, when the algorithm
    takes no such parameter, the ones it takes."""
    from xai_exp.config import ConfigError
    from xai_exp.explain.superpixels import check_segmentation

    by_key = {o.key_or_group: o for o in overrides}
    if "experiment" in by_key:
        return None  # an experiment may choose another preset: Hydra decides
    preset = _plain(by_key.get("lime")) if "lime" in by_key else "default"
    path = conf / "lime" / f"{preset}.yaml"
    if preset is None or not path.is_file():
        return None
    preset_config = OmegaConf.to_container(OmegaConf.load(path))
    segmentation = (
        preset_config.get("segmentation") or {} if isinstance(preset_config, dict) else {}
    )
    params = set(segmentation.get("params") or {})
    algorithm = _plain(by_key.get("lime.segmentation.algorithm")) or str(
        segmentation.get("algorithm", "quickshift")
    )
    for override in overrides:
        key = override.key_or_group
        if not key.startswith(SEGMENTATION_PARAMS) or override.is_delete():
            continue
        if override.is_add() or override.is_force_add():
            continue
        name = key[len(SEGMENTATION_PARAMS) :]
        if name in params:
            continue
        try:
            check_segmentation(algorithm, {name: None})
        except (ConfigError, AttributeError, ValueError) as error:
            return f"{error}; add one of them with +{SEGMENTATION_PARAMS}NAME=VALUE"
        value = override.input_line.partition("=")[2] if override.input_line else "VALUE"
        return f"{key}: lime={preset} sets no {name}; add it with +{key}={value}"
    return None


def _values(override: Override) -> list[Any]:
    """The values an override sets: one, or each of a choice or range sweep (not a glob)."""
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return []
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def unknown_choice(overrides: Iterable[Override], conf: Path) -> str | None:
    """One line for the first option no config group has (``method=nosuch``), with the
    closest option and the list of them."""
    groups = {
        path.name: sorted(file.stem for file in path.glob("*.yaml"))
        for path in conf.iterdir()
        if path.is_dir() and path.name != "hydra"
    }
    for override in overrides:
        options = groups.get(override.key_or_group)
        if options is None or override.is_delete():
            continue
        for value in _values(override):
            if not isinstance(value, str) or value in options:
                continue
            group = override.key_or_group
            close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
            hint = f"; did you mean {group}={close[0]}?" if close else ""
            return f"{group}={value} is not a {group} option{hint} (options: {', '.join(options)})"
    return None


def _field_type(key: str) -> Any:
    """The schema's type hint of a dotted key, or None when the key is not a typed field."""
    hint: Any = StudyConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def describe_type(hint: Any) -> str:
    """A type hint in words: ``int | None`` is "an integer or null"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        names = [describe_type(m) for m in members if m is not type(None)]
        if type(None) in members:
            names.append("null")
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint) or hint
    return {dict: "a mapping", list: "a list"}.get(origin, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def wrong_type(overrides: Iterable[Override], conf: Path) -> str | None:
    """One line for the first value the typed schema rejects (``lime.num_samples=abc``): the
    key, the value and the type it takes."""
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    schema = OmegaConf.structured(StudyConfig)
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or key in groups or key.startswith("hydra"):
            continue
        for value in _values(override):
            if isinstance(value, str) and "${" in value:
                continue  # an interpolation: Hydra resolves it later
            try:
                OmegaConf.update(schema.copy(), key, value, merge=True)
            except ValidationError as error:
                hint = _field_type(key)
                if hint is None:
                    return f"{key}={_shown(value)}: {str(error.msg).splitlines()[0]}"
                return f"{key}={_shown(value)}: expected {describe_type(hint)}"
            except OmegaConfBaseException:
                continue  # not a typed field (an added key): Hydra decides
    return None


def problem(args: Sequence[str], conf: Path) -> str | None:
    """One line for the first override that Hydra would reject: its grammar, a key no group
    or schema has, an option no group has, a value of the wrong type."""
    found = grammar_problem(args)
    if found is not None:
        return found
    overrides = OverridesParser.create().parse_overrides(candidates(args))
    found = unknown_key(overrides, conf)
    elsewhere = any(a.split("=")[0] in CONFIG_FLAGS for a in args) or any(
        o.key_or_group == "hydra.searchpath" for o in overrides
    )  # more config groups than conf/ has
    if found is None and not elsewhere:
        found = unknown_choice(overrides, conf) or unset_superpixel_param(overrides, conf)
    return found if found is not None else wrong_type(overrides, conf)
