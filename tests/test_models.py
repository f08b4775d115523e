"""Architectures: output shapes, embedded normalisation, parameter counts, registry errors."""
import copy

import pytest
import torch

from apb_sparse.models import Normalize, available_models, get_model
from apb_sparse.nn import masked_layers, to_masked

torch.manual_seed(0)

# (name, in_channels, input size, expected parameters at 10 classes in millions, tolerance)
CASES = [
    ("resnet18", 3, 32, 11.17, 0.05),
    ("preact_resnet18", 3, 32, 11.17, 0.05),
    ("vgg16", 3, 32, 14.72, 0.05),
    ("wrn28_4", 3, 32, 5.85, 0.05),
    ("wrn28_10", 3, 32, 36.48, 0.05),
    ("wrn34_10", 3, 32, 46.16, 0.05),
    ("small_cnn", 1, 8, 0.24, 0.02),
    # RobustBench's layouts: the published sizes of WRN-28-10 / WRN-34-10 / PreAct-ResNet-18
    ("robustbench:wrn28_10", 3, 32, 36.48, 0.05),
    ("robustbench:wrn34_10", 3, 32, 46.16, 0.05),
    ("robustbench:preact_resnet18", 3, 32, 11.17, 0.05),
    ("robustbench:preact_resnet18_v2", 3, 32, 11.17, 0.05),
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model():
    assert available_models() == sorted(c[0] for c in CASES)


@pytest.mark.parametrize("name,in_ch,size,mparams,tol", CASES)
def test_shape_and_parameter_count(name, in_ch, size, mparams, tol):
    model = get_model(name, num_classes=7, in_channels=in_ch).eval()
    out = model(torch.rand(2, in_ch, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    # the 10-class head differs from the 7-class one by 3 * (features + 1)
    ten = n_params(get_model(name, num_classes=10, in_channels=in_ch))
    assert abs(ten / 1e6 - mparams) <= tol, f"{name}: {ten} parameters"


@pytest.mark.parametrize("name,in_ch,size,mparams,tol", CASES)
def test_normalisation_is_inside_the_model(name, in_ch, size, mparams, tol):
    mean = [0.1 * (i + 1) for i in range(in_ch)]
    std = [0.2 + 0.1 * i for i in range(in_ch)]
    model = get_model(name, in_channels=in_ch, mean=mean, std=std).eval()
    assert isinstance(model.normalize, Normalize)
    sd = model.state_dict()
    assert torch.allclose(sd["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.allclose(sd["normalize.std"].flatten(), torch.tensor(std))
    # the same network without normalisation, fed pre-normalised input, gives the same output
    bare = copy.deepcopy(model)
    bare.normalize.mean.zero_()
    bare.normalize.std.fill_(1.0)
    x = torch.rand(2, in_ch, size, size)
    xn = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), bare(xn), atol=1e-5)
        assert not torch.allclose(model(x), bare(x), atol=1e-3)


def test_small_cnn_takes_28x28_and_is_small():
    model = get_model("small_cnn", in_channels=1).eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert 0.1e6 <= n_params(model) <= 0.3e6


def test_state_dict_round_trip_strict():
    a = get_model("resnet18", num_classes=10)
    b = get_model("resnet18", num_classes=10)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_to_masked_keeps_outputs():
    model = get_model("preact_resnet18", width=8).eval()
    masked = to_masked(model).eval()
    n_convs = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert len(list(masked_layers(masked))) == n_convs
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)


def test_wrn_depth_and_widen_options():
    """'{"widen": 10}' on wrn28_4 used to fail with "got multiple values for argument 'widen'"."""
    a = get_model("wrn28_4", widen=10)
    b = get_model("wrn28_10")
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    assert n_params(get_model("wrn28_4", depth=10, widen=1)) < 0.1e6
    with pytest.raises(ValueError, match="widen"):
        get_model("wrn28_4", widen=0)
    with pytest.raises(ValueError, match="depth"):
        get_model("wrn28_10", depth=27)


def test_names_are_canonicalised():
    from apb_sparse.models import canonical_name
    assert canonical_name("RobustBench:WRN-28-10") == "robustbench:wrn28_10"
    assert canonical_name("robustbench:wrn_34_10") == "robustbench:wrn34_10"
    assert canonical_name("WRN-28-4") == "wrn28_4"
    assert canonical_name("timm:resnet18") == "timm:resnet18"
    with pytest.raises(ValueError, match="robustbench:wrn28_10"):  # the message lists the names
        canonical_name("robustbench:wrn40_2")
    with pytest.raises(TypeError, match="width"):  # an option the architecture does not take
        get_model("vgg16", width=8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        get_model("resnet19")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match="in_channels|mean/std"):
        get_model("vgg16", in_channels=3, mean=[0.5, 0.5], std=[0.5, 0.5])
    with pytest.raises(ValueError, match="std"):
        get_model("small_cnn", in_channels=1, mean=[0.5], std=[0.0])


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_timm_model_by_name_sparsifies_with_the_same_outputs(name):
    pytest.importorskip("timm")
    import apb_sparse

    torch.manual_seed(0)
    model = get_model(f"timm:{name}", num_classes=7).eval()
    assert isinstance(model.normalize, Normalize)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    assert dense.shape == (2, 7)
    masked = apb_sparse.apply_masks(model, apb_sparse.magnitude_masks(model, 0.9)).eval()
    sparse = apb_sparse.sparsify(masked).eval()
    n_sparse = sum(isinstance(m, apb_sparse.nn.SparseConv2d) for m in sparse.modules())
    assert n_sparse > 0
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-4)


def test_timm_errors():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        get_model("timm:no_such_net")
    with pytest.raises(ValueError, match="timm model name"):
        get_model("timm:")
