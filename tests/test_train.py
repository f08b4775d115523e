"""Training loop: modes improve robustness, masks stay zero, hooks, scores, checkpoint/resume."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apb_sparse.data import get_dataset
from apb_sparse.models import get_model
from apb_sparse.nn import masked_layers, to_masked
from apb_sparse.robustness import evaluate
from apb_sparse.train import TrainConfig, accuracy, mode_loss, train

EPS = 0.15  # Linf radius on [0, 1] digits: large enough that natural training is clearly brittle
BASE = dict(epochs=4, batch_size=64, lr=0.05, eps=EPS, steps=5, seed=0)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def small(d, width=16, seed=0):
    torch.manual_seed(seed)
    return get_model("small_cnn", in_channels=1, width=width, mean=d.mean, std=d.std)


def pgd_acc(model, d):
    return evaluate(model, d, attack="pgd", eps=EPS, pgd_steps=20, n_samples=None,
                    checks=False).robust_accuracy


@pytest.fixture(scope="module")
def natural_pgd_acc(digits):
    model = small(digits)
    train(model, digits, TrainConfig(mode="natural", **BASE), progress=False)
    assert accuracy(model, digits) > 0.9
    return pgd_acc(model, digits)


@pytest.mark.parametrize("mode", ["pgd", "trades", "fgsm"])
def test_adversarial_modes_beat_natural_training_under_pgd(digits, natural_pgd_acc, mode):
    model = small(digits)
    log = train(model, digits, TrainConfig(mode=mode, **BASE), progress=False)
    assert len(log.loss) == BASE["epochs"] and log.loss[-1] < log.loss[0]
    assert accuracy(model, digits) > 0.75
    robust = pgd_acc(model, digits)
    # measured: natural ~0.19, adversarial modes 0.60-0.67
    assert robust > natural_pgd_acc + 0.2, (mode, robust, natural_pgd_acc)


def test_masked_weights_stay_exactly_zero(digits):
    model = to_masked(small(digits, width=8))
    gen = torch.Generator().manual_seed(0)
    masks = {}
    for name, layer in masked_layers(model):
        mask = (torch.rand(layer.weight.shape, generator=gen) > 0.6).float()
        layer.set_mask(mask)
        masks[name] = mask
    before = {n: l.weight.detach().clone() for n, l in masked_layers(model)}
    # A regulariser on the raw weights (as ADMM-style methods use) has a gradient on pruned
    # entries too: without the re-masking after each step they would become nonzero.
    raw_pull = lambda m, x, y: 1e-3 * sum(l.weight.sum() for _, l in masked_layers(m))
    train(model, digits, TrainConfig(mode="pgd", **{**BASE, "epochs": 1, "steps": 2}),
          extra_loss=raw_pull, progress=False)
    for name, layer in masked_layers(model):
        pruned = masks[name] == 0
        assert torch.count_nonzero(layer.weight[pruned]) == 0, name
        assert not torch.equal(layer.weight[~pruned], before[name][~pruned]), name


def test_scores_get_gradients_and_only_params_are_trained(digits):
    model = to_masked(small(digits, width=8))

    def topk_mask(layer):  # straight-through top-50 % of |scores|
        s = layer.scores
        k = s.numel() // 2
        thresh = s.abs().flatten().kthvalue(s.numel() - k).values
        hard = (s.abs() > thresh).to(s.dtype)
        return hard + s - s.detach()

    scores = []
    for _, layer in masked_layers(model):
        layer.scores = nn.Parameter(layer.weight.detach().abs().clone())
        layer.mask_fn = topk_mask
        scores.append(layer.scores)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "scores" not in n}
    s_before = [s.detach().clone() for s in scores]
    train(model, digits, TrainConfig(mode="natural", **{**BASE, "epochs": 1, "weight_decay": 0.0}),
          params=scores, progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(s_before, scores))
    for n, p in model.named_parameters():
        if "scores" not in n:
            assert torch.equal(p, weights[n]), n


def test_hooks_and_custom_losses(digits):
    steps, epochs = [], []
    model = small(digits, width=8)
    cfg = TrainConfig(mode="natural", **{**BASE, "epochs": 2})
    log = train(model, digits, cfg, progress=False, on_step=lambda s, m: steps.append(s),
                on_epoch_end=lambda e, m, lg: epochs.append((e, len(lg.loss))))
    per_epoch = -(-len(digits.train) // cfg.batch_size)
    assert steps == list(range(2 * per_epoch)) and log.steps == 2 * per_epoch
    assert epochs == [(0, 1), (1, 2)]

    # loss_fn replaces the mode's loss: PGD mode with a natural-CE loss_fn == natural training
    a, b = small(digits, width=8), small(digits, width=8)
    one = {**BASE, "epochs": 1}
    train(a, digits, TrainConfig(mode="natural", **one), progress=False)
    train(b, digits, TrainConfig(mode="pgd", **one), progress=False,
          loss_fn=lambda m, x, y: F.cross_entropy(m(x), y))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n

    # extra_loss is added: a huge L2 penalty shrinks the weights
    c = small(digits, width=8)
    train(c, digits, TrainConfig(mode="natural", **{**one, "weight_decay": 0.0}), progress=False,
          extra_loss=lambda m, x, y: 10.0 * sum((p ** 2).sum() for p in m.parameters()))
    norm = lambda m: sum(float(p.detach().norm()) for n, p in m.named_parameters() if "weight" in n)
    assert norm(c) < 0.5 * norm(a)


def test_mode_loss_is_differentiable_and_larger_under_attack(digits):
    model = small(digits, width=8).train()
    x, y = digits.tensors("train", 64)
    nat = mode_loss(model, x, y, TrainConfig(mode="natural", eps=EPS))
    adv = mode_loss(model, x, y, TrainConfig(mode="pgd", eps=EPS, steps=5))
    assert adv.requires_grad and float(adv) > float(nat)
    assert model.training  # attack ran in eval mode, mode restored


def test_resume_equals_uninterrupted_run(digits, tmp_path):
    cfg = TrainConfig(mode="pgd", **{**BASE, "epochs": 3, "steps": 3})
    ref = small(digits, width=8)
    ref_log = train(ref, digits, cfg, progress=False, checkpoint=tmp_path / "ref.pt")

    class Stop(Exception):
        pass

    def crash(epoch, model, log):
        if epoch == 1:
            raise Stop

    ckpt = tmp_path / "run.pt"
    first = small(digits, width=8)
    with pytest.raises(Stop):
        train(first, digits, cfg, progress=False, checkpoint=ckpt, on_epoch_end=crash)
    state = torch.load(ckpt, weights_only=True)  # safe format
    assert state["epoch"] == 1
    # a different run (here another eps) must not continue from this checkpoint
    with pytest.raises(ValueError, match="eps"):
        train(small(digits, width=8), digits, dataclasses.replace(cfg, eps=cfg.eps / 2), progress=False,
              checkpoint=ckpt, resume=True)
    resumed = small(digits, width=8, seed=123)  # different init: everything must come from ckpt
    log = train(resumed, digits, cfg, progress=False, checkpoint=ckpt, resume=True)
    assert log.loss == ref_log.loss and log.epoch == [0, 1, 2]
    for (n, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


def test_bad_config_and_arguments(digits):
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="madry")
    with pytest.raises(ValueError, match="norm"):
        TrainConfig(norm="L3")
    with pytest.raises(ValueError, match="eps"):
        TrainConfig(eps=-0.1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    cfg = TrainConfig(mode="natural", epochs=1)
    with pytest.raises(ValueError, match="checkpoint"):
        train(small(digits, width=8), digits, cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="params"):
        train(small(digits, width=8), digits, cfg, params=[], progress=False)
