"""Plug-ins: parts of `mace` that the core does not import, registered by name.

A plug-in package declares an entry point in the group ``mace.plugins`` whose object is a function
taking no argument; `load` calls each once, and it registers what it offers with
`register_command` (a `mace` sub-command) and `register_classifier` (a `mace eval --classifier`).
The toy world (``shared/toyworld``, `toyworld.plugin`) registers ``mace demo`` and the ``toy``
classifier this way; without it installed, neither exists and nothing else changes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from importlib.metadata import distributions
from typing import Callable

log = logging.getLogger("mace")

GROUP = "mace.plugins"


@dataclass(frozen=True)
class Command:
    """A `mace` sub-command: its one-line ``help``, ``add_arguments(parser)`` and ``run(args) -> exit code``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: `mace eval --classifier NAME`: factory(erased words, {word: synonyms} (may be extended), retained words)
#: -> (classifier: images [N, H, W, 3] uint8 -> labels, word -> the label it should get, retained words to check)
ClassifierFactory = Callable[[list, dict, list], tuple]

_COMMANDS: dict[str, Command] = {}
_CLASSIFIERS: dict[str, ClassifierFactory] = {}
_loaded = False


def register_command(name: str, command: Command) -> None:
    _COMMANDS[name] = command


def register_classifier(name: str, factory: ClassifierFactory) -> None:
    _CLASSIFIERS[name] = factory


def load() -> None:
    """Call every installed plug-in's registration function (once per process). A plug-in that fails to
    import is skipped with a log line: it must never break the commands that do not use it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    seen = set()
    # every distribution's metadata, not only the first of each name: a stale copy of this project's
    # metadata earlier on sys.path (an old egg-info beside the sources) must not hide the plug-ins
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP or (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            try:
                ep.load()()
            except ImportError as e:
                log.debug("mace plug-in %s not loaded: %s", ep.name, e)


def commands() -> dict[str, Command]:
    load()
    return dict(_COMMANDS)


def classifiers() -> dict[str, ClassifierFactory]:
    load()
    return dict(_CLASSIFIERS)
