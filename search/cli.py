"""``python search.py`` / ``mpq-search``: greedy mixed-precision search of a trained supernet.

    python search.py                                   # runs/default/supernet.pt, default budget
    python search.py --checkpoint runs/X/supernet.pt --budget 22.8G --out runs/X/search
    python search.py --checkpoint ... --budgets 34.7G,22.8G,14.4G   # several budgets, one path
    torchrun --nproc_per_node 4 search.py --checkpoint ...          # evaluation sharded over ranks

Outputs (in ``--out``, rank 0 only): ``config.json``, ``pareto.csv``, ``pareto.png``,
``model_fixed.pt`` (see the README). Errors a user can cause print one ``error: ...`` line on stderr
and exit with status 2.

This module only parses the command line and prints errors: the search is
:func:`search.pipeline.run_search`, and every option's default, choices and help text are
:class:`search.options.SearchOptions`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Dict, Optional, Sequence

from mpq.errors import UserError
from mpq.rundir import sigterm_exits

from .budget import ACCEPTED
from .options import SearchOptions, flag


def _add(group: Any, f: dataclasses.Field, kind: type) -> None:
    """Add the flag of :class:`SearchOptions` field ``f`` (``refine_top_k``: ``--refine-top-k``)
    with its default, help, type and choices. A switch that is on by default gets its ``--no-``
    form; one that is off is a plain flag."""
    kw: Dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    elif kind in (int, float):
        kw["type"] = kind
    if f.metadata["choices"]:
        kw["choices"] = f.metadata["choices"]
    group.add_argument(flag(f.name), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search.py",
        description="Greedy per-layer bit-width search of a trained mpq supernet under a BitOPs or "
                    "size budget (inference only), then export of the chosen fixed-precision model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Budgets: " + ACCEPTED + ". Without a budget the BitOPs of the uniform 3-bit "
               "configuration are used (or the middle of the achievable range when 3 bits is not a "
               "candidate). Outputs: config.json, pareto.csv, pareto.png, model_fixed.pt.")
    hints = typing.get_type_hints(SearchOptions)
    group: Any = p
    for f in dataclasses.fields(SearchOptions):   # in order; a field with a group title opens it
        if f.metadata["group"]:
            group = p.add_argument_group(f.metadata["group"])
        # Optional[int] -> int: the type the flag's text is converted to
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        _add(group, f, kind)
    return p


def run(args: argparse.Namespace) -> int:
    """The search of parsed arguments (:func:`search.pipeline.run_search`); returns 0."""
    from .pipeline import run_search
    run_search(SearchOptions.from_namespace(args))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python search.py`` and ``mpq-search``; returns the exit status."""
    parser = build_parser()

    def _arg_error(message: str) -> None:  # one line, like every other user error
        print(f"error: {message} (see search.py --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = _arg_error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed above)
        return int(e.code or 0)
    try:
        with sigterm_exits():
            return run(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a full disk, a vanished mount), not a bug: one line
        print(f"error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
