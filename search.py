"""Command-line entry point: ``python search.py --help``. All logic lives in the ``search`` package
(``search.cli.main``); this script only calls it. Run from the repository root, ``import search``
finds the package (a package directory takes precedence over this same-named module)."""
import sys

if __name__ == "__main__":
    # When run as a script, sys.path[0] is this folder, where the ``search/`` package lives next to
    # this file: make sure a stale ``search`` module (this script imported under its own name) never
    # shadows the package.
    mod = sys.modules.get("search")
    if mod is not None and not hasattr(mod, "__path__"):
        del sys.modules["search"]
    from search.cli import main

    raise SystemExit(main())
