"""Packaging for tfmeta: gradient-based meta-learning for TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="tfmeta",
    version="0.1.0",
    description="Fast, exact gradient-based meta-learning (MAML family and more) for TensorFlow 2 / Keras 3.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfmeta", "tfmeta.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets 4.9.10 imports it without requiring it
        "tensorboard>=2.20",  # tf.summary for the TensorBoard callback
        "keras-tuner>=1.4.8",  # tfmeta search (Auto-Meta)
    ],
    extras_require={
        # CPU-only TensorFlow (small wheel); the default for laptops, CI and this project's machines.
        "cpu": ["tensorflow-cpu==2.21.0"],
        # NVIDIA GPUs: TensorFlow with its CUDA libraries.
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        # `tfmeta bench --suite cost|accuracy --plot DIR`
        "bench": ["matplotlib>=3.8"],
        # `tfmeta export --tflite` runs and tests .tflite models in the LiteRT interpreter.
        "litert": ["ai-edge-litert>=2.3"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "matplotlib>=3.8", "ai-edge-litert>=2.3"],
    },
    entry_points={"console_scripts": ["tfmeta=tfmeta.app.cli:main"]},
)
