"""mpq: one-shot mixed-precision quantization supernets (train once, search bits, export)."""
from .errors import UserError
from .layers import QuantConv2d, QuantLinear, SwitchableBatchNorm2d
from .models import build_model, resnet20
from .quantizer import LsqQuantizer, fake_quant, lsq_fake_quant, qrange
from .supernet import (LayerReport, calibrate_activations, get_bits, max_config, min_config,
                       quant_layers, quantization_report, quantize_model, random_config, set_bits,
                       uniform_config, unwrap)

__version__ = "0.1.0"
__all__ = ["UserError", "QuantConv2d", "QuantLinear", "SwitchableBatchNorm2d", "build_model",
           "resnet20", "LsqQuantizer", "fake_quant", "lsq_fake_quant", "qrange",
           "calibrate_activations", "get_bits", "max_config", "min_config", "quant_layers",
           "quantize_model", "quantization_report", "LayerReport", "random_config", "set_bits", "uniform_config", "unwrap"]
