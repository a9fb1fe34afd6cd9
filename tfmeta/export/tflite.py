"""Few-shot adaptation on the device: a LiteRT (TFLite) flatbuffer of `adapt_and_predict`.

:func:`convert` turns a :class:`~tfmeta.core.learner.MetaLearner` into a ``.tflite`` flatbuffer with two
signatures, the same as the SavedModel's (:func:`tfmeta.export.export_adapter`):

- ``adapt_and_predict(support_x, support_y, query_x) -> {"logits"}``: the learner's inner loop (its
  optimizer, learned rates, T steps, as a LiteRT ``WHILE``) on the support set, then predictions of
  the adapted model on the query set;
- ``predict(x) -> {"logits"}``: predictions at the meta-learned initialization.

Regression learners answer ``{"predictions"}``. :func:`export_tflite` writes the flatbuffer as
``model.tflite`` inside a new SavedModel version (``saved_models/<name>/<version>/``, written and
renamed into place atomically like every version), and ``tfmeta export --run RUNDIR --tflite``
does the same from the command line.

Profiles
--------
- ``"builtin"``: LiteRT built-in ops only, so the model runs in the plain LiteRT runtime with no
  Flex delegate (what a phone app ships). It needs adaptation whose gradients have built-in
  kernels: head-only adaptation (ANIL, ``adapt="head"``; the features run forward only) converts.
  A learner whose inner loop needs TensorFlow kernels (e.g. ``adapt="all"`` on conv4 needs the
  gradients of max-pooling and convolution) is refused with a ``ValueError`` naming those ops,
  and nothing is written.
- ``"full"``: built-in ops plus TF Select ("Flex") ops for the rest. Runs only in an interpreter
  linked with the Flex delegate (``org.tensorflow:tensorflow-lite-select-tf-ops`` on Android,
  which adds MBs to the app; see ``docs/litert.md``). Neither ``ai-edge-litert`` 2.3 nor the
  TensorFlow 2.20+ pip wheels link it (their ``tf.lite.Interpreter`` refuses Flex ops); TensorFlow
  2.18's does, and :func:`run_flex` runs a flatbuffer in such another Python
  (``$TFMETA_FLEX_PYTHON``). :func:`flex_ops` lists the Flex ops of a flatbuffer.

Shapes
------
The support set is fixed per export: ``support_x [ways * shots, *features]`` float32,
``support_y [ways * shots]`` int32 class indices 0..ways-1 (regression: targets
``[shots, *outputs]``). ``query_x`` and ``x`` take any batch size ``[batch, *features]``: the query
pass is forward-only, and LiteRT re-plans the graph when the batch changes. :func:`check_inputs`
checks arrays against a signature before the interpreter sees them, and :class:`TFLiteAdapter`
runs a flatbuffer in the LiteRT interpreter (``ai_edge_litert``) with those checks.

BatchNorm follows the learner's policy, as in meta-training and the SavedModel: batch statistics
by default (the support batch in the inner loop, the query batch for the query pass).

Why the weights are frozen
--------------------------
Converting a function that reads TensorFlow variables, without their values being in what the
converter saves (``TFLiteConverter.from_concrete_functions`` with a Keras 3 model as trackable
object), leaves ``VAR_HANDLE`` / ``READ_VARIABLE`` ops with no initializer in the flatbuffer: the
interpreter reads uninitialised buffers and answers NaN even with zero inner steps, while
TensorFlow answers finite logits. :func:`convert` saves a module that tracks every variable the
functions read (so the converter folds their values into constants) and refuses any flatbuffer
that still holds variable ops.

Size (about 410 lines): conversion, the flatbuffer's op checks, the LiteRT adapter, the Flex runner and
the benchmark of one export format.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

#: Conversion profiles (see module docstring); the first is the default.
PROFILES = {
    "builtin": "LiteRT built-in ops only, no Flex delegate (head-only adaptation)",
    "full": "built-in ops plus TF Select (Flex) ops where the inner loop needs them",
}
DEFAULT_PROFILE = "builtin"
#: Name of the flatbuffer inside a SavedModel version.
FILENAME = "model.tflite"
SIGNATURES = ("adapt_and_predict", "predict")
_VARIABLE_OPS = ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE")
#: Environment variable: a Python whose ``tf.lite.Interpreter`` has the Flex delegate (see run_flex).
FLEX_PYTHON_ENV = "TFMETA_FLEX_PYTHON"


# -- reading flatbuffers (numpy and ai_edge_litert only) ----------------------------------------
def op_names(model_content: bytes) -> list[str]:
    """Every operator of every subgraph of a flatbuffer, by name (custom and Flex ops by code)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # exporting needs TensorFlow only, which ships the same schema
        from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_content), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for subgraph in model.subgraphs or []:
        for op in subgraph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            if builtin == schema.BuiltinOperator.CUSTOM:
                ops.append(code.customCode.decode())
            else:
                ops.append(names.get(builtin, str(builtin)))
    return ops


def flex_ops(model_content: bytes) -> list[str]:
    """The TF Select (Flex) ops of a flatbuffer, sorted, without the ``Flex`` prefix."""
    return sorted({op[len("Flex"):] for op in op_names(model_content) if op.startswith("Flex")})


def signature_inputs(interpreter, signature: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{input name: (shape, dtype)}`` of one signature; -1 marks a dimension of any size."""
    details = interpreter.get_signature_runner(signature).get_input_details()
    return {name: (tuple(int(d) for d in info["shape_signature"]), np.dtype(info["dtype"]))
            for name, info in details.items()}


def check_inputs(spec: dict, arrays: dict, *, num_classes: int | None = None) -> None:
    """Raise ValueError, naming the argument, if `arrays` do not fit a signature's `spec`
    (from :func:`signature_inputs`); class labels must lie in 0..num_classes-1 when given."""
    missing = sorted(set(spec) - set(arrays))
    unknown = sorted(set(arrays) - set(spec))
    if missing or unknown:
        raise ValueError(f"inputs {sorted(arrays)} do not match the signature's {sorted(spec)}.")
    for name, (shape, dtype) in spec.items():
        value = np.asarray(arrays[name])
        fits = value.ndim == len(shape) and all(d == -1 or d == v for d, v in zip(shape, value.shape))
        if not fits:
            wanted = "[" + ", ".join("any" if d == -1 else str(d) for d in shape) + "]"
            raise ValueError(f"{name} has shape {list(value.shape)}: the exported model expects {wanted}.")
        if value.dtype != dtype:
            raise ValueError(f"{name} has dtype {value.dtype}: the exported model expects {dtype}.")
    if num_classes is not None and "support_y" in arrays and np.issubdtype(np.asarray(arrays["support_y"]).dtype, np.integer):
        labels = np.asarray(arrays["support_y"])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"support_y holds labels {sorted(set(labels.tolist()))}: expected class "
                             f"indices 0..{num_classes - 1}.")


class TFLiteAdapter:
    """A ``.tflite`` from :func:`convert`, run by the LiteRT interpreter with input checks.

    Example:
        >>> model = TFLiteAdapter("saved_models/omniglot_maml/3/model.tflite")
        >>> logits = model.adapt_and_predict(support_x, support_y, query_x)
    """

    def __init__(self, path_or_content, *, interpreter_class=None, num_threads: int | None = None):
        if interpreter_class is None:
            from ai_edge_litert.interpreter import Interpreter as interpreter_class
        if isinstance(path_or_content, (bytes, bytearray)):
            self.interpreter = interpreter_class(model_content=bytes(path_or_content), num_threads=num_threads)
        else:
            if not os.path.isfile(path_or_content):
                raise ValueError(f"path={path_or_content!r} is not a .tflite file.")
            self.interpreter = interpreter_class(model_path=str(path_or_content), num_threads=num_threads)
        missing = set(SIGNATURES) - set(self.interpreter.get_signature_list())
        if missing:
            raise ValueError(f"the model lacks the signatures {sorted(missing)} of a tfmeta export.")
        self._runners = {s: self.interpreter.get_signature_runner(s) for s in SIGNATURES}
        self.specs = {s: signature_inputs(self.interpreter, s) for s in SIGNATURES}
        (self.output_key,) = self._runners["predict"].get_output_details()
        support_y_shape, dtype = self.specs["adapt_and_predict"]["support_y"]
        # Classification: int32 labels; the number of classes is the width of the logits.
        self.num_classes = None
        if np.issubdtype(dtype, np.integer):
            x_shape = self.specs["adapt_and_predict"]["support_x"][0]
            probe = np.zeros((1,) + x_shape[1:], self.specs["predict"]["x"][1])
            self.num_classes = int(self.predict(probe).shape[-1])

    def adapt_and_predict(self, support_x, support_y, query_x) -> np.ndarray:
        arrays = {"support_x": support_x, "support_y": support_y, "query_x": query_x}
        check_inputs(self.specs["adapt_and_predict"], arrays, num_classes=self.num_classes)
        return self._runners["adapt_and_predict"](**arrays)[self.output_key]

    def predict(self, x) -> np.ndarray:
        check_inputs(self.specs["predict"], {"x": x})
        return self._runners["predict"](x=x)[self.output_key]


# Runs in the other Python (any TensorFlow, numpy): argv = model, inputs.npz, outputs.npz, repeats, signature.
_FLEX_RUNNER = """
import json, sys, time
import numpy as np
import tensorflow as tf
model, inputs, outputs, repeats, signature = sys.argv[1:6]
runner = tf.lite.Interpreter(model_path=model).get_signature_runner(signature)
with np.load(inputs) as f:
    arrays = {k: f[k] for k in f.files}
result = runner(**arrays)
seconds = []
for _ in range(int(repeats)):
    start = time.perf_counter()
    runner(**arrays)
    seconds.append(time.perf_counter() - start)
np.savez(outputs, **result)
print(json.dumps({"tensorflow": tf.__version__, "seconds": seconds}))
"""


def run_flex(content: bytes, signature: str, arrays: dict, *, python: str, repeats: int = 0):
    """Run one signature of a flatbuffer in another Python's ``tf.lite.Interpreter``, for Flex ops.

    TensorFlow's pip wheels linked the Flex delegate into ``tf.lite.Interpreter`` up to 2.18 and
    dropped it in 2.20 (LiteRT issue 6458); ``ai-edge-litert`` 2.x has none. A full-profile model
    is therefore run where a TensorFlow <= 2.18 is installed: `python` (e.g. a virtual
    environment's). Returns ``(outputs, info)``: the signature's output arrays and
    ``{"tensorflow": version, "seconds": [...]}`` (`repeats` timed calls after the first).
    """
    import json
    import subprocess

    tmp = tempfile.mkdtemp(prefix="tfmeta-flex-")
    try:
        model, inputs, outputs = (os.path.join(tmp, f) for f in ("model.tflite", "inputs.npz", "outputs.npz"))
        with open(model, "wb") as f:
            f.write(content)
        np.savez(inputs, **{k: np.asarray(v) for k, v in arrays.items()})
        try:
            proc = subprocess.run([python, "-c", _FLEX_RUNNER, model, inputs, outputs, str(repeats), signature],
                                  capture_output=True, text=True, timeout=600)
        except OSError as err:
            raise ValueError(f"{FLEX_PYTHON_ENV}={python!r} cannot be run: {err}") from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no error output)"]
            raise RuntimeError(f"{FLEX_PYTHON_ENV}={python!r} could not run the model: {lines[-1]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(outputs) as f:
            return {k: f[k] for k in f.files}, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- conversion (TensorFlow) ------------------------------------------------------------------
def _module(learner, support: int):
    """A tf.Module with fixed-support `adapt_and_predict` and `predict`, tracking its variables."""
    import tensorflow as tf

    model = learner.model
    features = tuple(model.inputs[0].shape[1:])
    dtype = learner.dtype
    key = "logits" if learner.task == "classification" else "predictions"
    if learner.task == "classification":
        y_spec = tf.TensorSpec((support,), tf.int32, name="support_y")
    else:
        y_spec = tf.TensorSpec((support,) + tuple(model.outputs[0].shape[1:]), dtype, name="support_y")
    module = tf.Module(name="tfmeta_litert")
    # Tracked, so the SavedModel holds their values and the converter folds them into constants.
    module.meta_variables = [v.value for v in learner.meta_variables]
    module.state_variables = [v.value for v in model.non_trainable_variables]

    @tf.function(input_signature=[tf.TensorSpec((support,) + features, dtype, name="support_x"), y_spec,
                                  tf.TensorSpec((None,) + features, dtype, name="query_x")], autograph=False)
    def adapt_and_predict(support_x, support_y, query_x):
        meta = learner.unflatten(learner.meta_values())
        params = learner.adapt(meta, support_x, support_y, second_order=False)
        return {key: learner.fmodel(params, query_x)}

    @tf.function(input_signature=[tf.TensorSpec((None,) + features, dtype, name="x")], autograph=False)
    def predict(x):
        meta = learner.unflatten(learner.meta_values())
        return {key: learner.fmodel(meta.init, x)}

    module.adapt_and_predict, module.predict = adapt_and_predict, predict
    return module


def support_size(learner, shots: int) -> int:
    """Examples in the support set: ways * shots (classification) or shots (regression)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots={shots!r} is not valid: expected an integer >= 1.")
    if learner.task == "classification":
        return int(learner.model.outputs[0].shape[-1]) * shots
    return shots


def convert(learner, *, shots: int, profile: str = DEFAULT_PROFILE) -> bytes:
    """The ``.tflite`` flatbuffer of `learner` for N-way `shots`-shot support sets (see module doc).

    Raises ValueError naming the ops that need Flex when `profile="builtin"` cannot hold the
    learner's inner loop, and RuntimeError if the converter left variable ops (see module doc).
    """
    import tensorflow as tf

    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not valid: expected one of {list(PROFILES)}.")
    if learner.dtype != tf.float32:
        raise ValueError(f"the model's dtype is {learner.dtype.name}: LiteRT export needs a float32 model.")
    module = _module(learner, support_size(learner, shots))
    tmp = tempfile.mkdtemp(prefix="tfmeta-litert-")
    try:
        tf.saved_model.save(module, tmp, signatures={
            "adapt_and_predict": module.adapt_and_predict.get_concrete_function(),
            "predict": module.predict.get_concrete_function(),
        })

        def run_converter(ops):
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(SIGNATURES))
            converter.target_spec.supported_ops = ops
            return converter.convert()

        builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
        select = builtins + [tf.lite.OpsSet.SELECT_TF_OPS]
        if profile == "builtin":
            try:
                content = run_converter(builtins)
            except Exception as err:  # ConverterError; find which ops would need Flex
                try:
                    needed = flex_ops(run_converter(select))
                except Exception:
                    raise ValueError(f"the learner cannot be converted to LiteRT: {err}") from None
                raise ValueError(
                    f"profile='builtin' (--tflite-profile builtin) cannot hold this learner's inner loop (adapt mode, "
                    f"layers, inner optimizer): these ops have no LiteRT built-in kernel and need the "
                    f"Flex delegate: {', '.join(needed)}. Export with profile='full' (--tflite-profile full), or "
                    f"meta-train with adapt='head' (features forward-only).") from None
        else:
            content = run_converter(select)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    left = sorted(set(op_names(content)) & set(_VARIABLE_OPS))
    if left:
        raise RuntimeError(f"the converted model still reads variables ({', '.join(left)}): its weights "
                           "were not frozen, and LiteRT would read uninitialised buffers.")
    if profile == "builtin" and flex_ops(content):
        raise ValueError(f"profile='builtin' produced Flex ops {flex_ops(content)}.")
    return content


def export_tflite(learner, base_dir: str, name: str, *, shots: int, profile: str = DEFAULT_PROFILE) -> str:
    """Write ``base_dir/name/<next version>/`` with the SavedModel of `export_adapter` and
    ``model.tflite`` (see :func:`convert`), atomically; returns the version's path.

    The conversion runs first: if it fails, nothing is written.
    """
    from tfmeta import export

    content = convert(learner, shots=shots, profile=profile)
    return export.export_adapter(learner, base_dir, name, files={FILENAME: content})


def benchmark(*, ways: int = 5, shots: int = 1, query: int = 15, filters: int = 64, inner_steps: int = 5,
              repeats: int = 20, num_threads: int | None = None, seed: int = 0,
              profile: str = DEFAULT_PROFILE, flex_python: str | None = None) -> dict:
    """Size and latency of `adapt_and_predict`: the ``.tflite`` of `profile` against the SavedModel.

    A conv4 adapting for `inner_steps` SGD steps, random weights and inputs (the cost does not
    depend on training); `ways * shots` support and `ways * query` query images. ``"builtin"``
    adapts the head (ANIL) and runs in the LiteRT interpreter (``ai_edge_litert``); ``"full"``
    adapts every layer (MAML) and needs the Flex delegate: it runs in `flex_python` (see
    :func:`run_flex`) when given, else its LiteRT latency is ``None`` with the interpreter's
    refusal in ``litert_error``. Median seconds of `repeats` calls after one warm-up call.
    """
    import statistics
    import time

    import keras
    import tensorflow as tf

    from tfmeta.core import models
    from tfmeta.core.learner import MetaLearner

    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not valid: expected one of {list(PROFILES)}.")
    keras.utils.set_random_seed(seed)
    adapt = "head" if profile == "builtin" else "all"
    learner = MetaLearner(models.conv4(ways, filters=filters), inner_steps=inner_steps, adapt=adapt)
    rng = np.random.default_rng(seed)
    sx = rng.random((ways * shots, 28, 28, 1)).astype("float32")
    sy = np.repeat(np.arange(ways, dtype=np.int32), shots)
    qx = rng.random((ways * query, 28, 28, 1)).astype("float32")
    arrays = {"support_x": sx, "support_y": sy, "query_x": qx}
    root = tempfile.mkdtemp(prefix="tfmeta-litert-bench-")
    try:
        start = time.perf_counter()
        path = export_tflite(learner, root, "bench", shots=shots, profile=profile)
        export_seconds = time.perf_counter() - start
        tflite = os.path.join(path, FILENAME)
        with open(tflite, "rb") as f:
            content = f.read()
        result = {"profile": profile, "adapt": adapt, "ways": ways, "shots": shots, "query": ways * query,
                  "filters": filters, "inner_steps": inner_steps, "repeats": repeats, "num_threads": num_threads,
                  "tflite_bytes": len(content), "flex_ops": flex_ops(content), "export_seconds": export_seconds}

        def timed(call):
            output = call()  # warm-up (the SavedModel traces, LiteRT plans)
            seconds = []
            for _ in range(repeats):
                begin = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - begin)
            return output, statistics.median(seconds)

        served = tf.saved_model.load(path).signatures["adapt_and_predict"]
        tensors = {k: tf.constant(v) for k, v in arrays.items()}
        expected, result["saved_model_seconds_median"] = timed(lambda: served(**tensors)["logits"].numpy())
        result["litert_runtime"], result["litert_seconds_median"], got = None, None, None
        try:
            lite = TFLiteAdapter(content, num_threads=num_threads)
            got, result["litert_seconds_median"] = timed(lambda: lite.adapt_and_predict(sx, sy, qx))
            import ai_edge_litert

            result["litert_runtime"] = f"ai_edge_litert {getattr(ai_edge_litert, '__version__', '')}".strip()
        except RuntimeError as err:
            if "Select TensorFlow op" not in str(err):
                raise
            if flex_python is None:
                result["litert_error"] = str(err).splitlines()[0]
            else:
                outputs, info = run_flex(content, "adapt_and_predict", arrays, python=flex_python, repeats=repeats)
                got = outputs["logits"]
                result["litert_seconds_median"] = statistics.median(info["seconds"])
                result["litert_runtime"] = f"tf.lite.Interpreter with Flex (TensorFlow {info['tensorflow']}, {flex_python})"
        result["max_abs_difference"] = None if got is None else float(np.abs(got - expected).max())
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
