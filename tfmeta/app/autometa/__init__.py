"""Auto-Meta: progressive architecture search for gradient-based meta-learners, on KerasTuner.

Kim et al. 2018, summarised in Sun's overview, Sec. 5; see docs/autometa.md.

- :mod:`tfmeta.app.autometa.space`: cells of blocks, expansions, encodings, JSON descriptions;
- :mod:`tfmeta.app.autometa.builder`: an architecture as a plain Keras functional model;
- :mod:`tfmeta.app.autometa.surrogate`: the MLP-ensemble predictor and Spearman rank correlation;
- :mod:`tfmeta.app.autometa.config`: :class:`SearchConfig` and the samplers;
- :mod:`tfmeta.app.autometa.oracle`: the progressive KerasTuner oracle;
- :mod:`tfmeta.app.autometa.search`: the tuner, the candidate evaluator, :func:`run_search`;
- :mod:`tfmeta.app.autometa.cli`: ``tfmeta search``; :mod:`tfmeta.app.autometa.benchmark`: found vs. conv4;
- :mod:`tfmeta.app.autometa.synthetic`: a glyph image family for searches without Omniglot.

Example:
    >>> from tfmeta.app.autometa import SearchConfig, run_search
    >>> result = run_search(SearchConfig.quick(dataset="synthetic", out="/tmp/am"))  # doctest: +SKIP

References:
    Kim, J. et al. "Auto-Meta: Automated Gradient Based Meta Learner Search." 2018.
    arXiv:1806.06927.

    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)
"""

from tfmeta.app.autometa.builder import build_model
from tfmeta.app.autometa.search import SearchConfig, run_search
from tfmeta.app.autometa.space import OPERATORS, Architecture, Cell
from tfmeta.app.autometa.surrogate import Surrogate, spearman

__all__ = ["OPERATORS", "Architecture", "Cell", "SearchConfig", "Surrogate", "build_model",
           "run_search", "spearman"]
