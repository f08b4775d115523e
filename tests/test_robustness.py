"""Attacks and evaluation: PGD geometry, AutoAttack parity, FMN vs PGD, masking checks, errors."""
import pytest
import torch
from torch import nn

import apb_sparse
from apb_sparse.data import get_dataset
from apb_sparse.models import get_model
from apb_sparse.nn import to_masked
from apb_sparse.robustness import evaluate, fmn_distances, pgd
from apb_sparse.train import TrainConfig, train

EPS = 0.15


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


@pytest.fixture(scope="module")
def robust_model(digits):
    torch.manual_seed(0)
    model = get_model("small_cnn", in_channels=1, width=16, mean=digits.mean, std=digits.std)
    train(model, digits, TrainConfig(mode="pgd", epochs=4, batch_size=64, lr=0.05, eps=EPS, steps=5),
          progress=False)
    return model.eval()


@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 1.0)])
def test_pgd_stays_in_the_ball_and_the_box(robust_model, digits, norm, eps):
    x, y = digits.tensors("test", 100)
    torch.manual_seed(0)
    xa = pgd(robust_model, x, y, norm=norm, eps=eps, steps=10, restarts=2)
    d = (xa - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        clean = (robust_model(x).argmax(1) == y).float().mean()
        adv = (robust_model(xa).argmax(1) == y).float().mean()
    assert adv < clean - 0.1
    assert torch.equal(pgd(robust_model, x, y, norm=norm, eps=0.0), x)


def test_more_restarts_and_steps_are_not_weaker(robust_model, digits):
    x, y = digits.tensors("test", 200)
    acc = {}
    for steps, restarts in [(5, 1), (20, 3)]:
        torch.manual_seed(0)
        xa = pgd(robust_model, x, y, eps=EPS, steps=steps, restarts=restarts)
        with torch.no_grad():
            acc[steps] = float((robust_model(xa).argmax(1) == y).float().mean())
    assert acc[20] <= acc[5]


def test_evaluate_matches_direct_pyautoattack(robust_model, digits):
    from pyautoattack import AutoAttack

    attacks = ["apgd-ce", "apgd-t"]
    res = evaluate(robust_model, digits, attack=attacks, eps=EPS, n_samples=50, batch_size=50,
                   seed=0, checks=False)
    x, y = digits.tensors("test", 50)
    direct = AutoAttack(robust_model, norm="Linf", eps=EPS, version="custom", attacks=attacks,
                        seed=0, device="cpu")
    _, y_adv = direct.run_standard_evaluation(x, y, batch_size=50)
    assert torch.equal(res.robust, y_adv == y)
    assert res.robust_accuracy == int((y_adv == y).sum()) / 50
    assert 0 < res.robust_accuracy < res.clean_accuracy
    assert list(res.per_attack) == ["clean"] + attacks
    assert res.per_attack["apgd-t"] == res.robust_accuracy <= res.per_attack["apgd-ce"]


@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 1.0)])
def test_fmn_distances_agree_with_pgd(robust_model, digits, tmp_path, norm, eps):
    res = evaluate(robust_model, digits, attack="fmn", norm=norm, eps=eps, n_samples=100,
                   checks=False, plot=tmp_path / "curve.png")
    pg = evaluate(robust_model, digits, attack="pgd", norm=norm, eps=eps, n_samples=100,
                  pgd_restarts=3, checks=False)
    dist = res.distances
    assert dist.shape == (100,) and bool((dist[~res.correct] == 0).all())
    # samples PGD breaks at eps have a minimal distance <= eps (10 % slack for FMN's inexactness)
    broken = pg.correct & ~pg.robust
    assert broken.sum() >= 10
    assert float((dist[broken] <= 1.1 * eps).float().mean()) >= 0.9
    # samples FMN breaks well inside the ball are broken by PGD too
    inside = dist < 0.8 * eps
    assert float((~pg.robust[inside]).float().mean()) >= 0.9
    assert abs(res.robust_accuracy - pg.robust_accuracy) <= 0.1
    # security curve: starts at clean accuracy, never rises, PNG written
    grid, acc = res.security_curve
    assert grid[0] == 0 and acc[0] == res.clean_accuracy
    assert all(b <= a for a, b in zip(acc, acc[1:]))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fmn_adversarials_are_real(robust_model, digits):
    x, y = digits.tensors("test", 40)
    dist, xa = fmn_distances(robust_model, x, y, norm="Linf", steps=50, batch_size=15)  # 15+15+10
    found = torch.isfinite(dist) & (dist > 0)
    assert found.sum() >= 20
    with torch.no_grad():
        assert bool((robust_model(xa[found]).argmax(1) != y[found]).all())
    size = (xa - x).flatten(1).abs().amax(1)
    assert torch.allclose(size[found], dist[found], atol=1e-6)


class _ZeroGrad(nn.Module):
    """Same predictions, zero input gradient: the textbook gradient-masking defence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).detach() + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_masking_checks_pass_on_a_sound_model_and_flag_masking(robust_model, digits):
    ok = evaluate(robust_model, digits, attack="pgd", eps=EPS, n_samples=100)
    assert {c.name for c in ok.checks} == {"eps_monotone", "large_eps_breaks",
                                           "more_steps_not_weaker", "black_box_not_stronger"}
    assert not ok.masking_suspected, ok.checks
    masked = evaluate(_ZeroGrad(robust_model), digits, attack="pgd", eps=EPS, n_samples=100)
    assert masked.robust_accuracy > ok.robust_accuracy + 0.2  # it *looks* more robust...
    assert masked.masking_suspected  # ...and is flagged
    failed = {c.name for c in masked.checks if not c.passed}
    assert {"large_eps_breaks", "black_box_not_stronger"} <= failed
    quick = evaluate(robust_model, digits, attack="pgd", eps=EPS, n_samples=20, checks=False)
    assert quick.checks == [] and not quick.masking_suspected


class _Constant(nn.Module):
    """A collapsed model: one class for every input (with an input gradient, so no masking)."""

    def __init__(self, label: int, classes: int = 10):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(label), classes).float() * 5)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.01 * x.flatten(1).mean(1, keepdim=True)


def test_large_eps_check_bar_is_the_majority_prediction_share(digits):
    """A constant predictor keeps its class's images at any eps (about 10 % of digits, above the
    0.05 tolerance): that is collapse, not gradient masking, and must not be flagged."""
    x, y = digits.tensors("test", 64)
    label = int(torch.bincount(y).argmax())
    share = float((y == label).float().mean())
    assert share > 0.05  # the old fixed bar (tolerance 0.05) flagged this model
    res = evaluate(_Constant(label), (x, y), attack="pgd", eps=EPS, check_samples=64)
    big = next(c for c in res.checks if c.name == "large_eps_breaks")
    assert big.passed, big.detail
    assert big.detail["pgd_accuracy"] == pytest.approx(share)
    assert big.detail["majority_prediction_share"] == 1.0 and big.detail["tolerance"] == 0.05


def test_evaluate_accepts_tensors_and_restores_mode(robust_model, digits):
    x, y = digits.tensors("test", 30)
    robust_model.train()
    res = evaluate(robust_model, (x, y), attack="pgd", eps=EPS, checks=False)
    assert robust_model.training
    robust_model.eval()
    assert res.n_samples == 30 and res.wall_time > 0
    assert res.to_dict()["robust_accuracy"] == res.robust_accuracy


def test_bad_arguments_name_the_argument(robust_model, digits):
    kw = dict(n_samples=10, checks=False)
    with pytest.raises(ValueError, match="attack"):
        evaluate(robust_model, digits, attack="cw", **kw)
    with pytest.raises(ValueError, match="attack"):
        evaluate(robust_model, digits, attack=["apgd-ce", "deepfool"], **kw)
    with pytest.raises(ValueError, match="eps"):
        evaluate(robust_model, digits, attack="pgd", eps=-0.1, **kw)
    with pytest.raises(ValueError, match="norm"):
        evaluate(robust_model, digits, attack="pgd", norm="L3", **kw)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(robust_model, digits, attack="pgd", n_samples=0, checks=False)
    with pytest.raises(ValueError, match="norm"):
        pgd(robust_model, *digits.tensors("test", 4), norm="L1", eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(robust_model, *digits.tensors("test", 4), eps=0.1, steps=0)


def test_masked_model_and_its_sparsified_model_evaluate_the_same(robust_model, digits):
    model = to_masked(robust_model)
    from apb_sparse.nn import masked_layers

    for _, layer in masked_layers(model):
        w = layer.weight.detach().abs()
        layer.set_mask((w > w.flatten().kthvalue(int(0.7 * w.numel())).values).float())
    train(model, digits, TrainConfig(mode="pgd", epochs=1, batch_size=64, lr=0.01, eps=EPS, steps=3),
          progress=False)
    model.eval()
    sparse = apb_sparse.sparsify(model).eval()
    assert any("Sparse" in type(m).__name__ for m in sparse.modules())
    x, y = digits.tensors("test")
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), sparse(x).argmax(1))
    for attack in ("pgd", ["apgd-ce"]):
        a = evaluate(model, digits, attack=attack, eps=EPS, n_samples=60, seed=0, checks=False)
        b = evaluate(sparse, digits, attack=attack, eps=EPS, n_samples=60, seed=0, checks=False)
        assert a.clean_accuracy == b.clean_accuracy
        assert a.robust_accuracy == b.robust_accuracy, attack
