"""Built-in example data sets and models (``nnsqueeze demo`` uses :mod:`nnsqueeze.zoo.mnist1d`)."""

__all__ = ["mnist1d"]
