"""atkd-cache: distil autoregressive LMs from an offline teacher cache."""

__version__ = "0.1.0"
