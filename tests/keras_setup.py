"""Shared prelude of the Keras tests that run in the pytest process: Keras on TensorFlow, or the whole
test module is skipped.

Those tests compare with hand-written ``tf.GradientTape`` references (and tf-keras-vis), so they need
Keras' TensorFlow backend; Keras reads ``KERAS_BACKEND`` once, at import. The JAX and torch backends
of Keras run in child interpreters (tests/test_keras_other_backends.py), whatever this process uses.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


def import_keras() -> Any:
    """``keras`` (with TensorFlow's C++ logs quiet), skipping the calling module where Keras or
    TensorFlow is not installed, or where Keras runs on another backend (``KERAS_BACKEND``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here (KERAS_BACKEND): these tests compare with "
                    "TensorFlow references; tests/test_keras_other_backends.py covers Keras' JAX and torch backends",
                    allow_module_level=True)
    pytest.importorskip("tensorflow", reason="Keras' TensorFlow backend needs tensorflow (pip install 'camlens[keras]')")
    return keras
