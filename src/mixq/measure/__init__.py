"""Sensitivity measurement: per-layer × per-candidate error proxies → SensitivityTable."""
from .driver import ALGORITHMS, measure, measurement_key
from .metrics import METRICS, LayerSensitivity, layer_error

__all__ = ["ALGORITHMS", "METRICS", "LayerSensitivity", "layer_error", "measure", "measurement_key"]
