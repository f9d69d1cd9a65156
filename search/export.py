"""Deprecated alias of :mod:`mpq.export` (kept for one release; import from ``mpq.export``).

The fixed-precision export is part of the supernet library (:mod:`mpq.export`), so that ``mpq``
never imports ``search``; the ONNX writer stays here, in :mod:`search.onnx_export`.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

from mpq.export import (FORMAT, VERSION, FixedConv2d, FixedLinear, _FixedMixin, export,  # noqa: F401
                        fixed_from_payload, fixed_model, fixed_payload, float_model_bytes, layer_arrays,
                        load_fixed, pack_codes, unpack_codes)

warnings.warn("search.export is deprecated and will be removed in the next release: import from "
              "mpq.export (and search.onnx_export.to_onnx for ONNX)", DeprecationWarning, stacklevel=2)


def to_onnx(model_or_payload, path: str, **kwargs) -> Dict[str, Any]:
    """Deprecated: :func:`search.onnx_export.to_onnx`."""
    from .onnx_export import to_onnx as _to_onnx
    return _to_onnx(model_or_payload, path, **kwargs)
