"""Export of a searched configuration as a fixed-precision model (``mpq.export.export``,
``mpq.export.load_fixed``).

The implementation lives in :mod:`search.export`; these wrappers import it lazily so that
``import mpq`` never imports the search side (and no import cycle can form).
"""
from __future__ import annotations

from typing import Any, Dict


def export(net, config, path: str, spec=None, **kwargs) -> Dict[str, Any]:
    """Write the fixed-precision model of ``config``; see :func:`search.export.export`."""
    from search.export import export as _export
    return _export(net, config, path, spec=spec, **kwargs)


def load_fixed(path: str, model=None):
    """Load an exported fixed-precision model; see :func:`search.export.load_fixed`."""
    from search.export import load_fixed as _load_fixed
    return _load_fixed(path, model=model)


__all__ = ["export", "load_fixed"]
