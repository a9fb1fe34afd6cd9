"""The core layer: what every other layer builds on, and which imports nothing above it.

- :mod:`tfmeta.core.functional`: a Keras model as a pure function of its weights (exact BatchNorm
  moments in inner loops);
- :mod:`tfmeta.core.inner_optimizers`: optax-like pure ``init`` / ``update`` inner optimizers;
- :mod:`tfmeta.core.inner_loop`: T optimizer steps with observers, gradient reuse, remat;
- :mod:`tfmeta.core.learner`: :class:`~tfmeta.core.learner.MetaLearner`, what is meta-learned;
- :mod:`tfmeta.core.task`: shared types (``Task``, ``MetaGradient``);
- :mod:`tfmeta.core.linearity`: LIL's trajectory metrics and regularizers;
- :mod:`tfmeta.core.models`, :mod:`tfmeta.core.plain`: model builders, plain Keras models;
- :mod:`tfmeta.core.randomness`, :mod:`tfmeta.core.replica_state`: seeds, per-replica task rows;
- :mod:`tfmeta.core.runtime`: threads, logical devices, tf.distribute strategies, Grappler options;
- :mod:`tfmeta.core.checks`, :mod:`tfmeta.core.files`: the validation vocabulary, atomic writes.

Nothing is imported here: ``tfmeta.core._backend`` must run before Keras loads.
"""
