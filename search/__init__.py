"""mpq search side: cost model, evaluation, greedy bit-width search, Pareto path and export."""
from .cost import BitOpsCounter, CostModel, bitops, measure_macs, model_size_bytes

__all__ = ["BitOpsCounter", "bitops", "measure_macs", "model_size_bytes"]
from .budget import Budget, parse_budget, parse_budget_list
from .evaluator import Evaluator, ForwardCounter, evaluate, recalibrate_bn
from mpq.export import export as export_fixed, load_fixed, pack_codes, unpack_codes
from .greedy import SearchResult, Step, greedy_search, refine_search, refine_supernet, search_supernet

__all__ += ["Budget", "parse_budget", "parse_budget_list", "Evaluator", "ForwardCounter", "evaluate",
            "recalibrate_bn", "export_fixed", "load_fixed", "pack_codes", "unpack_codes", "CostModel",
            "SearchResult", "Step", "greedy_search", "refine_search", "refine_supernet",
            "search_supernet"]
