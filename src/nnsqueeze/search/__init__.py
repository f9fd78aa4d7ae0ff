"""Search: find the recipe, measured on the target, as a Pareto front of metric, size and latency.

    import nnsqueeze as nsq
    res = nsq.search(model, "cnn", train_data=train, calib_data=calib, eval_data=test,
                     metric="accuracy", max_drop=0.005, trials=40, out="search/", seed=0)
    res.front        # the feasible, non-dominated trials
    res.best         # the fastest of them (DIR/best.yaml, DIR/best/)

One concern per module: ``space`` (the YAML space, trial -> recipe), ``cache`` (shared recipe
prefixes), ``study`` (optuna study, workers, trials), ``front`` (Pareto front, table, plot),
``api`` (checks and outputs), ``html`` (the HTML report). See docs/search.md.

Note: ``nnsqueeze.search`` as an attribute of the package is the function (the modules stay
importable as ``nnsqueeze.search.space`` etc.).
"""

from .api import search
from .space import Space, load_space, spaces
from .study import SearchResult

__all__ = ["search", "SearchResult", "Space", "load_space", "spaces"]
