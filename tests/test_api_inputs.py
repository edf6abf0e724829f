"""Bad values in the API: non-finite pixels and scores, tensor / NumPy targets, input dtypes,
torch.inference_mode(), buffers in train mode, and which outputs count as classification heads."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.core.targets import split_outputs


class Net(nn.Module):
    """conv -> ReLU -> GAP -> Linear(8, 10); optionally returns extra outputs."""

    def __init__(self, out="logits"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 4)
        self.out = out

    def forward(self, x):
        a = self.body(x)
        f = a.mean((2, 3))
        logits = self.fc(f)
        feats = f.repeat(1, 64)  # (B, 512): a feature vector, not a head
        if self.out == "tuple":
            return logits, feats
        if self.out == "dict":
            return {"logits": logits, "features": feats}
        if self.out == "dict2":
            return {"species": logits, "colour": self.aux(f), "image_embeds": feats, "pooledOutput": feats}
        if self.out == "tuple2":
            return logits, self.aux(f)
        if self.out == "map_first":
            return a, logits
        return logits


def _x(b=2, s=12, seed=0):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


# ---------------------------------------------------------------------------------------------
# NaN / Inf


def test_nan_or_inf_pixels_are_an_error_naming_the_images(net):
    x = _x(3)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in image\(s\) \[1\]"):
        camlens.explain(net, x, targets=1, layer="body")
    x = _x(3)
    x[0, 1, 0, 0] = float("inf")
    x[2, 2, 5, 5] = -float("inf")
    with pytest.raises(ValueError, match=r"NaN/Inf in image\(s\) \[0, 2\]"):
        camlens.explain(net, x, targets=1, layer="body", method="occlusion", patch=4)


def test_non_finite_model_scores_name_the_images_and_targets(net):
    with torch.no_grad():
        net.fc.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"image 0 target '3'.*image 1 target '3'") as err:
        camlens.explain(net, _x(), targets=[1, 3], layer="body")
    assert "'1'" not in str(err.value)  # class 1 is finite
    ok = camlens.explain(net, _x(), targets=1, layer="body")  # finite targets still work
    assert torch.isfinite(ok.maps).all()


# ---------------------------------------------------------------------------------------------
# tensor / NumPy targets


def test_one_d_tensor_and_array_targets_are_one_class_per_image(net):
    x = _x()
    ref = camlens.explain(net, x, targets=[[3], [5]], layer="body")
    for t in (torch.tensor([3, 5]), np.array([3, 5]), np.array([3, 5], dtype=np.int32),
              [torch.tensor([3]), np.array([5])]):
        exp = camlens.explain(net, x, targets=t, layer="body")
        assert [[tg.cls for tg in row] for row in exp.targets] == [[3], [5]]
        assert torch.equal(exp.maps, ref.maps)
    assert [[tg.cls for tg in r] for r in camlens.explain(net, x, targets=[3, 5], layer="body").targets] == [[3, 5]] * 2


def test_two_d_and_scalar_targets(net):
    x = _x()
    exp = camlens.explain(net, x, targets=torch.tensor([[1, 2], [3, 4]]), layer="body")
    assert [[tg.cls for tg in row] for row in exp.targets] == [[1, 2], [3, 4]]
    assert torch.equal(exp.maps, camlens.explain(net, x, targets=[[1, 2], [3, 4]], layer="body").maps)
    for t in (torch.tensor(7), np.int64(7), np.array(7), [np.int64(7)], [torch.tensor(7)], ("0", torch.tensor(7))):
        exp = camlens.explain(net, x, targets=t, layer="body")
        assert [[tg.cls for tg in row] for row in exp.targets] == [[7], [7]]


@pytest.mark.parametrize("t,err,match", [
    (torch.tensor([1, 2, 3]), ValueError, "one class per image: got 3 classes for a batch of 2"),
    (np.array([[1, 2]]), ValueError, r"\(B, T\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"\(B, T\)"),
    (torch.zeros(2, 1, 1, dtype=torch.long), ValueError, "0-D .* 1-D .* 2-D"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer class indices"),
    (np.array([True, False]), TypeError, "integer class indices"),
])
def test_bad_tensor_targets_are_clear_errors(net, t, err, match):
    with pytest.raises(err, match=match):
        camlens.explain(net, _x(), targets=t, layer="body")


# ---------------------------------------------------------------------------------------------
# dtypes


def test_integer_inputs_to_a_plain_module_name_the_cause(net):
    u8 = (torch.rand(2, 3, 12, 12) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match="uint8 image tensor.*convert to float and normalise.*camlens.models.load"):
        camlens.explain(net, u8, targets=1, layer="body")
    with pytest.raises(TypeError, match="torch.int64 tensor"):
        camlens.explain(net, u8.long(), targets=1, layer="body")


def test_uint8_tensor_with_a_loaded_model_is_preprocessed():
    lm = camlens.models.load("shapes-2head")
    u8 = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    exp = camlens.explain(lm, u8, targets=["shape:0"])
    ref = camlens.explain(lm, list(u8.permute(0, 2, 3, 1).numpy()), targets=["shape:0"])
    assert torch.equal(exp.maps, ref.maps) and exp.display is not None


def test_float64_inputs_are_cast_to_the_models_dtype(net):
    x = _x()
    ref = camlens.explain(net, x, targets=[1, 2], layer="body")
    exp = camlens.explain(net, x.double(), targets=[1, 2], layer="body")
    assert exp.inputs.dtype == torch.float32
    assert torch.allclose(exp.maps, ref.maps, atol=1e-6)


def test_half_and_double_models_take_float_inputs():
    torch.manual_seed(0)
    x = _x()
    ref = camlens.explain(Net().eval(), x, targets=1, layer="body")
    torch.manual_seed(0)
    exp = camlens.explain(Net().eval().double(), x, targets=1, layer="body")
    assert exp.maps.dtype == torch.float32 and torch.allclose(exp.maps, ref.maps, atol=1e-5)
    torch.manual_seed(0)
    half = Net().eval().half()
    for precision in ("fp32", "fp16"):  # fp16 autocast with float inputs worked before and still does
        exp = camlens.explain(half, x, targets=1, layer="body", precision=precision)
        assert exp.maps.dtype == torch.float32 and torch.isfinite(exp.maps).all()
        assert (exp.maps - ref.maps).abs().max() < 0.05
    assert all(p.dtype == torch.float16 for p in half.parameters())


# ---------------------------------------------------------------------------------------------
# torch.inference_mode()


@pytest.mark.parametrize("method", ["gradcam", "guided_backprop", "scorecam"])
def test_explain_works_under_inference_mode(net, method):
    x = _x()
    ref = camlens.explain(net, x, targets=[1, 2], layer="body", method=method)
    with torch.inference_mode():
        xi = x.clone()
        exp = camlens.explain(net, xi, targets=[1, 2], layer="body", method=method)
        assert torch.is_inference_mode_enabled()  # the caller's mode is untouched
    assert torch.allclose(exp.maps, ref.maps, atol=1e-6)
    assert not exp.maps.is_inference()
    exp2 = camlens.explain(net, xi, targets=[1, 2], layer="body", method=method)  # an inference tensor outside
    assert torch.allclose(exp2.maps, ref.maps, atol=1e-6)


def test_evaluate_works_under_inference_mode(net):
    x = _x()
    exp = camlens.explain(net, x, targets=[1, 2], layer="body")
    kw = dict(metrics=["deletion", "average_drop", "mprt"], options={"deletion": {"step": 16}})
    ref = camlens.evaluate(net, x, exp, **kw)
    with torch.inference_mode():
        got = camlens.evaluate(net, x.clone(), exp, **kw)  # mprt re-explains: needs gradients
        assert torch.is_inference_mode_enabled()
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-6), name


def test_a_model_built_under_inference_mode_is_a_clear_error():
    with torch.inference_mode():
        m = Net().eval()
    with pytest.raises(RuntimeError, match="inference tensor .*inference_mode"):
        camlens.explain(m, _x(), targets=1, layer="body")


# ---------------------------------------------------------------------------------------------
# buffers with eval_mode=False


def _buffers(model):
    return {n: (b.data_ptr(), b.clone()) for n, b in model.named_buffers()}


def _assert_same_buffers(model, before):
    now = dict(model.named_buffers())
    assert now.keys() == before.keys()
    for n, (ptr, val) in before.items():
        assert now[n].data_ptr() == ptr, n
        assert torch.equal(now[n], val), n


def test_eval_mode_false_restores_every_buffer_also_after_an_error():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(weights=None).train()
    before = _buffers(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probe = copy.deepcopy(model)
    with torch.no_grad():
        probe(x)  # a plain train-mode forward changes the BatchNorm statistics and counters
    changed = [n for n, b in probe.named_buffers() if not torch.equal(b, before[n][1])]
    assert len(changed) >= 90 and any(n.endswith("num_batches_tracked") for n in changed)
    exp = camlens.explain(model, x, targets=[1, 2], layer="features", eval_mode=False)
    assert exp.maps.shape == (2, 2, 64, 64)
    _assert_same_buffers(model, before)
    assert all(m.training for m in model.modules())
    with pytest.raises(IndexError):  # raised after the (train-mode) forward
        camlens.explain(model, x, targets=5000, layer="features", eval_mode=False)
    _assert_same_buffers(model, before)
    camlens.explain(model, x, targets=1, layer="features", eval_mode=True)  # eval BN: nothing to restore
    _assert_same_buffers(model, before)
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# which outputs are classification heads


def _heads_of(exp):
    return [[tg.head for tg in row] for row in exp.targets]


def test_tuple_logits_features_explains_the_logits_only():
    torch.manual_seed(0)
    model = Net("tuple").eval()
    x = _x()
    exp = camlens.explain(model, x, layer="body")
    assert _heads_of(exp) == [[0], [0]]
    assert [row[0].cls for row in exp.targets] == model(x)[0].argmax(1).tolist()
    assert _heads_of(camlens.explain(model, x, layer="body", top_k=2)) == [[0, 0], [0, 0]]
    both = camlens.explain(model, x, layer="body", heads=[0, 1])  # override: both count
    assert _heads_of(both) == [[0, 1], [0, 1]]
    assert _heads_of(camlens.explain(model, x, layer="body", heads=1)) == [[1], [1]]
    assert exp.maps.shape == (2, 1, 12, 12)


def test_named_outputs_count_every_head_except_feature_names():
    torch.manual_seed(0)
    x = _x()
    assert _heads_of(camlens.explain(Net("dict").eval(), x, layer="body")) == [["logits"]] * 2
    model = Net("dict2").eval()
    assert _heads_of(camlens.explain(model, x, layer="body")) == [["species", "colour"]] * 2
    assert _heads_of(camlens.explain(model, x, layer="body", heads=["colour"], top_k=2)) == [["colour"] * 2] * 2
    assert _heads_of(camlens.explain(model, x, layer="body", heads="image_embeds")) == [["image_embeds"]] * 2
    all_ = camlens.explain(model, x, layer="body", targets="all", heads=["colour"])
    assert _heads_of(all_)[0] == ["colour"] * 4


def test_evaluate_heads_for_plain_maps():
    torch.manual_seed(0)
    model, x = Net("dict2").eval(), _x()
    maps = torch.rand(2, 4, 12, 12, generator=torch.Generator().manual_seed(1))
    s = camlens.evaluate(model, x, maps, metrics=["average_drop"], targets="all", heads=["colour"])
    assert s["average_drop"].shape == (2, 4)  # colour has 4 classes (species would give 10)
    with pytest.raises(ValueError, match="T=4"):
        camlens.evaluate(model, x, maps, metrics=["average_drop"], targets="all")  # species: 10 targets


def test_default_rule_on_positional_outputs():
    from camlens.core.targets import class_heads

    x = _x()
    heads = split_outputs(Net("tuple2").eval()(x))
    assert class_heads(heads) == [0]  # (logits, aux_logits): the first only; heads=[0, 1] for both
    assert class_heads(split_outputs(Net("map_first").eval()(x))) == [1]  # maps never count
    assert class_heads({0: torch.randint(0, 5, (2, 3))}) == []  # integer outputs never count
    with pytest.raises(ValueError, match="heads=") as err:
        camlens.explain(Net("map_first").eval(), x, layer="body", heads=[0])
    assert "(B, K)" in str(err.value)
    with pytest.raises(KeyError, match="no model output 'nope'"):
        camlens.explain(Net("dict").eval(), x, layer="body", heads=["nope"])


def test_shapes_two_heads_and_heads_through_a_loaded_model():
    lm = camlens.models.load("shapes-2head")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    exp = camlens.explain(lm, x)
    assert _heads_of(exp) == [["shape", "colour"]] * 2
    one = camlens.explain(lm, x, heads=["colour"])
    assert _heads_of(one) == [["colour"]] * 2
    assert torch.allclose(one.maps[:, 0], exp.maps[:, 1], atol=1e-6)
    tiled = camlens.explain(lm, x, heads=["colour"], tile=48, overlap=16)
    assert _heads_of(tiled) == [["colour"]] * 2
