"""mt: a machine-translation trainer built on the Transformer of Vaswani et al. (2017)."""

__version__ = "0.1.0"
