"""Benchmarks of convlstm_fast: ``python -m convlstm_fast.bench`` (or ``convlstm-bench``).

:mod:`.harness` times functions (median, p20/p80) and counts saved-for-backward bytes;
:mod:`.cases` defines the shapes, runners, Table 1 and network costs; :mod:`.suite` runs a
configuration; :mod:`.report` writes markdown, JSON and PNG plots.
"""

from .cases import COMPILE, DEFAULT_SHAPES, PAPER_SHAPES, QUICK_SHAPES, CellShape, table1
from .harness import Timing, saved_state_tensors, time_function
from .suite import BenchConfig, NetworkConfig, default_config, run_suite

__all__ = ["COMPILE", "DEFAULT_SHAPES", "PAPER_SHAPES", "QUICK_SHAPES", "BenchConfig", "CellShape",
           "NetworkConfig", "Timing", "default_config", "run_suite", "saved_state_tensors",
           "table1", "time_function"]
