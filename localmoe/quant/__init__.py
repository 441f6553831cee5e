"""Quantized weights: the integer form every quantized weight takes (weight.py), the schemes asked for by name
(scheme.py) and the pass that quantizes a loaded model (apply.py)."""
