"""Steering evaluations: layer x scale sweeps run as one batch, locally or on a server.

Example::

    from vinterp.evals import sweep, show
    rows = sweep(model, vector, layers=[6, 8], scales=[-4, 0, 4], out_dir="out")
    print(show("out"))
"""

from vinterp.evals.results import METRICS, mean_ci, summarize
from vinterp.evals.show import best_cells, pareto_front, show
from vinterp.evals.sweep import SweepError, sweep

__all__ = ["METRICS", "SweepError", "best_cells", "mean_ci", "pareto_front", "show",
           "summarize", "sweep"]
