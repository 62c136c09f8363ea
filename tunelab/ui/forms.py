"""The config form: built from the config schema, read back through the CLI's own parsing.

Every field of ``FineTuningConfig`` becomes one input holding its value as YAML (what a config
file or ``--set`` takes), grouped by the stage each field declares (``config.STAGES``), with a
list of the values its Literal type allows. Values go back through ``parse_override`` and
``config_from_dict``, so a wrong value fails with the very message ``tunelab train --set``
prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from tunelab.config import (
    FIELDS,
    STAGES,
    FineTuningConfig,
    _default,
    choices_of,
    config_from_dict,
    parse_override,
    stage_keys,
    yaml_text,
)
from tunelab.errors import TunelabError


@dataclass
class FormField:
    name: str
    value: str  # YAML text, as a config file or --set holds it
    default: str
    help: str
    choices: tuple[str, ...] | None


def stage_groups() -> list[tuple[str, list[str]]]:
    """[(stage title, field names)] in the order of ``config.STAGES``."""
    return [(STAGES[stage], names) for stage, names in stage_keys().items() if names]


as_yaml = yaml_text  # one config value as the YAML a user would type
default_of = _default


def form_fields(
    values: dict[str, Any], raw: dict[str, str] | None = None
) -> list[tuple[str, list[FormField]]]:
    """The form's groups of fields, each holding ``values[name]`` (or its default), or the
    text the user typed (``raw``) when the form comes back with an error."""
    raw = raw or {}
    out = []
    for title, names in stage_groups():
        fields = []
        for name in names:
            current = values.get(name, default_of(name))
            # a list key (report_to, ...) stays a text input: a select holds one value
            choices = None if isinstance(current, list) else choices_of(name)
            fields.append(
                FormField(
                    name,
                    raw[name] if name in raw else as_yaml(current),
                    as_yaml(default_of(name)),
                    FIELDS[name].metadata["help"],
                    tuple(map(str, choices)) if choices else None,
                )
            )
        out.append((title, fields))
    return out


def parse_form(form: dict[str, str]) -> dict[str, Any]:
    """Form text back to config values, each read as ``--set key=value`` reads it."""
    values = {}
    for name, raw in form.items():
        if name not in FIELDS:
            continue
        key, value = parse_override(f"{name}={raw}")
        values[key] = value
    return values


def error_key(message: str) -> str | None:
    """The config key a validation message is about (the first quoted key it names)."""
    for quoted in re.findall(r"'([A-Za-z_][\w.]*)'", message):
        key = quoted.split(".")[0]
        if key in FIELDS:
            return key
    return None


def check_form(form: dict[str, str]) -> tuple[FineTuningConfig | None, dict[str, str]]:
    """A validated config, or the CLI's message for the first wrong value keyed by its field
    (key ``""`` when no single field is to blame)."""
    try:
        return config_from_dict(parse_form(form), source="config"), {}
    except TunelabError as exc:
        message = str(exc)
        return None, {error_key(message) or "": message}


def estimate_text(config: FineTuningConfig) -> str:
    """What ``tunelab estimate CONFIG`` prints for this config on this machine."""
    from tunelab.planning.architecture import ESTIMATE_METHODS
    from tunelab.planning.cli import setup_values
    from tunelab.planning.estimate import format_estimate, run_estimate
    from tunelab.planning.memory import TrainingSetup

    if config.method not in ESTIMATE_METHODS:
        return f"method {config.method!r} has no estimate; estimates cover " + ", ".join(
            ESTIMATE_METHODS
        )
    setup = TrainingSetup(**setup_values(config))
    return format_estimate(run_estimate(config.model_name, setup))


def config_yaml(config: FineTuningConfig) -> str:
    """The YAML the form saves: every key, the same file ``tunelab train`` reads."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
