"""Sensitivity measurement: per-layer × per-candidate error proxies → SensitivityTable.

``driver`` (the resumable walk), ``layer`` / ``metrics`` / ``gradients`` (the error proxies), ``distributed``;
``kv``: every attention layer's K and V error at each KV-cache width → ``KVSensitivityTable`` (``measure_kv``).
"""
from .driver import ALGORITHMS, is_measurement_of, measure, measurement_key
from .metrics import METRICS, LayerSensitivity, layer_error

__all__ = ["ALGORITHMS", "METRICS", "LayerSensitivity", "layer_error", "measure", "measurement_key"]
