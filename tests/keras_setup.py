"""Shared prelude of the Keras tests: Keras on TensorFlow, or the whole test module is skipped."""

from __future__ import annotations

import os
from typing import Any

import pytest


def import_keras() -> Any:
    """``keras`` (with TensorFlow's C++ logs quiet), skipping the calling module where Keras is not
    installed or runs on another backend than TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the Keras backend of camlens runs Keras on TensorFlow", allow_module_level=True)
    return keras
