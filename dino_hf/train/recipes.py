"""Recipes: YAML/JSON files of training arguments, and the ones shipped inside the package
(``dino_hf/recipes/*.yaml``, ``--config NAME``), read into argument values with the flags' own types.

One reader for both ways in: ``--config`` on the command line (:mod:`dino_hf.train.argument_parsing`)
and ``DinoTrainingArguments(config=...)`` / ``DinoTrainingArguments.from_recipe`` in Python.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
from typing import Any

import yaml
from transformers import HfArgumentParser

from dino_hf.base.run_folder import RUN_FACT_KEYS

__all__ = ["RUN_LENGTH_FLAGS", "applies_its_recipe", "load_config_file", "recipe_values", "resolve_config_path",
           "shipped_recipes"]

#: The flags that set how long a run is; one given explicitly replaces a recipe's others.
RUN_LENGTH_FLAGS = ("max_steps", "num_train_epochs", "max_train_minutes")


def shipped_recipes() -> dict[str, Any]:
    """``{name: resource}`` of the recipes shipped inside the package (``dino_hf/recipes/*.yaml``)."""
    folder = importlib.resources.files("dino_hf") / "recipes"
    return {entry.name.rsplit(".", 1)[0]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(path: str) -> str:
    """``--config`` as a readable file: the path itself, else the shipped recipe of that name
    (``fashion_mnist_cpu`` or ``fashion_mnist_cpu.yaml``).

    Raises:
        ValueError: neither a file nor a shipped recipe (the sentence lists the recipes).
    """
    if os.path.isfile(os.path.expanduser(path)):
        return os.path.expanduser(path)
    recipes = shipped_recipes()
    name = os.path.basename(path)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    # a bare name, or the old scripts/configs/NAME.yaml path from outside a source checkout
    if name in recipes and (path in (name, f"{name}.yaml") or os.path.dirname(path).endswith("configs")):
        return str(recipes[name])
    raise ValueError(
        f"--config {path} is neither a YAML/JSON file nor a shipped recipe ({', '.join(sorted(recipes))})."
    )


def _actions_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag's action under its field name and under each alias (``--eval_label_column``...)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        actions[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                actions.setdefault(option[2:], action)
    return actions


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML/JSON config file (or a shipped recipe, by name) into argument values, converted
    with the flags' own types. Old spellings of a flag (its aliases) are accepted as keys.

    Raises:
        ValueError: one sentence naming the file and the offending key.
    """
    path = resolve_config_path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} could not be read as YAML/JSON ({error.__class__.__name__}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of argument names to values.")  # noqa: TRY004

    if "learning_rate" in values and "scaled_learning_rate" in values and "base_learning_rate" not in values:
        # the training_args.json of a run of dino_hf < 0.2, where learning_rate was the per-256 value
        values = {**values, "base_learning_rate": values["learning_rate"], "learning_rate": None}
    actions = _actions_by_name(parser)
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if key in RUN_FACT_KEYS or key == "config":
            continue
        action = actions.get(key)
        if action is None or key == "help":
            raise ValueError(f"--config {path}: '{key}' is not a training argument (see --help).")
        converted[action.dest] = _convert_config_value(path, key, value, action)
    return converted


def _convert_config_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """Convert one config-file value the way argparse converts the flag's string, and check choices."""
    convert = action.type if callable(action.type) else None

    def one(item: Any) -> Any:
        if item is None or convert is None:
            return item
        if convert is float and isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
        if convert is int and isinstance(item, int) and not isinstance(item, bool):
            return item
        if isinstance(item, bool) and convert is not int and convert is not float:
            return item
        try:
            return convert(item if isinstance(item, str) else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"--config {path}: '{key}' has value {item!r}, which is not a valid {key}.") from None

    if action.nargs == "+":
        items = value if isinstance(value, (list, tuple)) else [value]
        result: Any = [one(item) for item in items]
    else:
        if isinstance(value, (list, dict)):
            raise ValueError(f"--config {path}: '{key}' takes a single value, not {value!r}.")
        result = one(value)
    if action.choices is not None and result is not None and result not in action.choices:
        raise ValueError(f"--config {path}: '{key}' must be one of {', '.join(map(str, action.choices))}.")
    return result


def recipe_values(config: str, parser: argparse.ArgumentParser, given: set[str]) -> dict[str, Any]:
    """The values of recipe ``config`` that the explicitly ``given`` arguments leave in force.

    A run length among ``given`` (``max_steps``, ``num_train_epochs``, ``max_train_minutes``) replaces
    the recipe's: e.g. ``max_steps`` for a smoke run of a time-budgeted recipe.
    """
    values = load_config_file(config, parser)
    if given & set(RUN_LENGTH_FLAGS):
        values = {key: value for key, value in values.items() if key not in RUN_LENGTH_FLAGS}
    return {key: value for key, value in values.items() if key not in given}


def applies_its_recipe(cls: type) -> type:
    """The class decorator of ``DinoTrainingArguments``:
    ``DinoTrainingArguments(config=NAME_OR_FILE, **values)`` starts from the recipe's values, and
    the keyword arguments given override them, as flags override ``--config`` on the command line
    (a run length given replaces the recipe's). The command line, which passes every field, is
    unaffected: its parser applied the recipe already."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, config: str | None = None, **values: Any) -> None:  # noqa: N807
        if config is not None:
            parser = HfArgumentParser(cls)
            values = {**recipe_values(config, parser, given=set(values)), **values}
        dataclass_init(self, config=config, **values)

    cls.__init__ = __init__
    return cls
