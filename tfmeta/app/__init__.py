"""The application layer: the `tfmeta` command line and what only it needs.

- :mod:`tfmeta.app.cli`: ``tfmeta train | evaluate | export | bench | search`` (dispatch), with
  :mod:`tfmeta.app.parser` (the flags) and :mod:`tfmeta.app.commands` (what they do);
- :mod:`tfmeta.app.flags`: flags shared by the subcommands (estimator options derived from the
  estimators' constructors);
- :mod:`tfmeta.app.config`: ``RunConfig``, the one source of a run's defaults, and the builders
  of a run's learner, estimator and samplers;
- :mod:`tfmeta.app.presets`, :mod:`tfmeta.app.bench`, :mod:`tfmeta.app.suites`,
  :mod:`tfmeta.app.profiling`, :mod:`tfmeta.app.rundir`;
- :mod:`tfmeta.app.autometa`: Auto-Meta's architecture search (``tfmeta search``).

The top of the layering: it imports every layer below, nothing imports it (but the package's
``__main__`` and console script).
"""
