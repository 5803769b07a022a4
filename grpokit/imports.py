"""Importing a user's ``package.module:function``, for every stage that takes one (rewards,
comparators, metrics): one place that says clearly what failed and where it looked."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable


def extend_import_path(folders) -> list[str]:
    """Append ``folders`` (and the working directory) to ``sys.path`` where missing: a user's module
    beside the recipe imports as a script's sibling would. Appended, not prepended, so a user file
    named like an installed package (``datasets.py``) cannot shadow it. Returns the folders searched."""
    wanted = [str(Path(f).resolve()) for f in (*folders, Path.cwd())]
    for folder in dict.fromkeys(wanted):
        if folder not in sys.path:
            sys.path.append(folder)
    return list(dict.fromkeys(wanted))


def import_function(name: str, what: str, error: type[Exception], search_path: list[str] = ()) -> Callable:
    """The function ``package.module:function`` names; every failure is ``error`` saying what failed
    and, for a module not found, where it was looked for."""
    module_name, _, attr = name.partition(":")
    searched = extend_import_path(search_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the named module itself, not one it imports
            raise error(f"{what} {name!r}: no module {module_name!r} in the installed packages or in the folders "
                        f"searched ({', '.join(searched)}); put {module_name.replace('.', '/')}.py beside the recipe "
                        "(its folder is searched first) or in a folder listed in python_path") from None
        raise error(f"{what} {name!r}: module {module_name!r} imports {exc.name!r}, which is not installed "
                    f"({exc})") from None
    except (Exception, SystemExit) as exc:  # an import can fail in any way (sys.exit too); report it, do not crash
        raise error(f"{what} {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{what} {name!r}: module {module_name!r} has no function {attr!r} "
                    f"(the module is {getattr(module, '__file__', None) or 'built in'})")
    return fn


def resolve_name(name: str, registry: dict, what: str, error: type[Exception], unknown: str,
                 search_path: list[str] = ()) -> Callable:
    """What a recipe names: a registry entry, or ``package.module:name`` imported; ``unknown`` is the
    message for a bare name the registry lacks."""
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise error(unknown)
    return import_function(name, what, error, search_path)
