"""Built-in example data sets and models (``nnsqueeze demo`` uses :mod:`nnsqueeze.zoo.mnist1d`;
``nnsqueeze demo --llm`` uses :mod:`nnsqueeze.zoo.pylm`)."""

__all__ = ["mnist1d", "pycorpus", "pylm"]
