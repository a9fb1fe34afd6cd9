"""Auto-Meta: progressive architecture search for gradient-based meta-learners, on KerasTuner.

Kim et al. 2018, summarised in Sec. 5 of 001_7e396414bca289e5.txt; see docs/autometa.md.

- :mod:`tfmeta.autometa.space`: cells of blocks, expansions, encodings, JSON descriptions;
- :mod:`tfmeta.autometa.builder`: an architecture as a plain Keras functional model;
- :mod:`tfmeta.autometa.surrogate`: the MLP-ensemble predictor and Spearman rank correlation;
- :mod:`tfmeta.autometa.search`: the KerasTuner oracle and tuner, :func:`run_search`;
- :mod:`tfmeta.autometa.cli`: ``tfmeta search``; :mod:`tfmeta.autometa.benchmark`: found vs. conv4;
- :mod:`tfmeta.autometa.synthetic`: a glyph image family for searches without Omniglot.

Example:
    >>> from tfmeta.autometa import SearchConfig, run_search
    >>> result = run_search(SearchConfig.quick(dataset="synthetic", out="/tmp/am"))  # doctest: +SKIP
"""

from tfmeta.autometa.builder import build_model
from tfmeta.autometa.search import SearchConfig, run_search
from tfmeta.autometa.space import OPERATORS, Architecture, Cell
from tfmeta.autometa.surrogate import Surrogate, spearman

__all__ = ["OPERATORS", "Architecture", "Cell", "SearchConfig", "Surrogate", "build_model",
           "run_search", "spearman"]
