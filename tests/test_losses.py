"""Each loss against values worked out by hand on tiny tensors."""
import math

import pytest
import torch

from attnprobe.method.losses import (
    NoiseAdaptation,
    class_weights,
    kd_loss,
    probe_distill_loss,
)


def test_kd_loss_by_hand():
    # T = 2; teacher logits (2, 0) -> p = softmax(1, 0); student logits (0, 0) -> q = (1/2, 1/2)
    t, s = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p1 = math.e / (math.e + 1)
    kl = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(kl * 4, rel=1e-6)
    # identical logits: zero; batch mean and per-sample weights
    t2 = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    s2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert kd_loss(s2, t2, 2.0).item() == pytest.approx(kl * 4 / 2, rel=1e-6)
    w = torch.tensor([3.0, 0.5])
    assert kd_loss(s2, t2, 2.0, sample_weights=w).item() == pytest.approx(3 * kl * 4 / 2, rel=1e-6)


def test_noise_adaptation_by_hand():
    na = NoiseAdaptation(3, alpha=0.8)
    with torch.no_grad():
        na.q.copy_(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [math.log(4.0), 0.0]]))
    M = na.transition_matrix()
    expected = torch.tensor([[0.8, 0.2 * 1 / 4, 0.2 * 3 / 4],
                             [0.1, 0.8, 0.1],
                             [0.2 * 4 / 5, 0.2 * 1 / 5, 0.8]])
    torch.testing.assert_close(M, expected)
    # student softmax (1/2, 1/4, 1/4) from logits log(2), 0, 0; teacher says class 2
    s = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    noisy_2 = 0.5 * 0.15 + 0.25 * 0.1 + 0.25 * 0.8
    assert na(s, torch.tensor([2])).item() == pytest.approx(-math.log(noisy_2), rel=1e-6)
    # gradient reaches Q (it is trained jointly)
    na(s, torch.tensor([2])).backward()
    assert na.q.grad.abs().sum() > 0


def test_noise_adaptation_initial_rows_are_uniform():
    M = NoiseAdaptation(4, alpha=0.7).transition_matrix()
    torch.testing.assert_close(M.sum(1), torch.ones(4))
    assert M[0, 1].item() == pytest.approx(0.1)


def test_probe_distill_loss_by_hand():
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.0, 0.0]])]
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.0], [0.0, 1.0]])]
    # layer 1: mean((1, 0)^2) = 0.5; layer 2: mean(0, .25, 0, 1) = 0.3125; mean over layers
    assert probe_distill_loss(t, s).item() == pytest.approx((0.5 + 0.3125) / 2)


def test_class_weights_by_hand():
    # inverse sums (1, 1/2, 1/4) -> normalised to sum 3
    w = class_weights([1.0, 2.0, 4.0], 3)
    assert w == pytest.approx([3 * 4 / 7, 3 * 2 / 7, 3 * 1 / 7])
    assert sum(w) == pytest.approx(3)
