"""Export: versioned SavedModels for TF Serving (:mod:`tfmeta.export.savedmodel`) and LiteRT
flatbuffers for devices (:mod:`tfmeta.export.tflite`).

The layer above training: it turns a trained learner into files other programs load. The
SavedModel functions are re-exported here, so ``tfmeta.export.export_adapter(...)`` works as
before; the LiteRT exporter is imported on demand (``from tfmeta.export import tflite``).
"""

from tfmeta.export.savedmodel import (
    clean_stale_tmp, export_adapted, export_adapter, export_model, load, versions,
)

__all__ = ["clean_stale_tmp", "export_adapted", "export_adapter", "export_model", "load", "versions"]
