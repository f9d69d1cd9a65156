"""mpq search side: cost model, evaluation, greedy bit-width search, Pareto path and export."""
from .cost import BitOpsCounter, bitops, measure_macs, model_size_bytes

__all__ = ["BitOpsCounter", "bitops", "measure_macs", "model_size_bytes"]
