import importlib.util
import os
import warnings

import pytest

try:
    import torch
except ImportError:  # an environment without torch (camlens[keras]): only the Keras tests run there
    torch = None
if torch is not None and importlib.util.find_spec("tensorflow") is not None:
    # torch._dynamo imported after TensorFlow can segfault the process; Keras test modules import TF at
    # collection, and torch tests (guided backprop's dispatch mode, torch.compile) import dynamo later
    import torch._dynamo  # noqa: F401

os.environ.setdefault("MPLBACKEND", "Agg")
if torch is not None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    if torch is not None:
        torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.resnet18().eval()


@pytest.fixture(scope="session")
def vgg11():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    return tv.models.vgg11().eval()


@pytest.fixture
def quantus():
    """Quantus (a dev extra) for the cross-checks; under CI=true a missing Quantus fails the test
    instead of skipping it, so a cross-check cannot silently never run."""
    try:
        import quantus as q
    except ImportError as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"quantus is not installed ({err}): pip install -e '.[dev]'")
        pytest.skip("quantus is not installed (pip install -e '.[dev]')")
    return q


@pytest.fixture
def input_gradient_method():
    """The name of a method registered for the test that returns the runner's plain input gradients
    ``(B, T, C, H, W)`` as ``exp.pixel`` (no registered method asks for plain ones)."""
    from camlens.methods.base import _REGISTRY, Method, MethodOutput, register
    from camlens.methods.guided import channel_saliency

    class InputGradient(Method):
        def compute(self, ctx):
            g, _ = ctx.runner.input_gradients(ctx.inputs, ctx.score_all, guided=False)
            return MethodOutput(saliency=channel_saliency(g), pixel=g)

    m = register(InputGradient(name="test_input_gradient", description="d S / d x", cost="1 forward + 1 backward",
                               needs_grads=False, needs_layer=False))
    yield m.name
    _REGISTRY.pop(m.name)
