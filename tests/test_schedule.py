"""The learning-rate schedules of train.lr_schedule, epoch by epoch."""
import math

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.training.loop import lr_schedule


def factors(schedule, epochs, warmup_epochs=0):
    """The LR factor each 0-based epoch trains with (the loop steps the scheduler after each epoch)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, schedule, epochs, warmup_epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_matches_the_reference_epoch_count():
    # the reference runs epochs e = 1, 2, ... and trains epoch e at lr * 0.1 ** ((e >= 200) + (e >= 300));
    # 0-based epoch k is its epoch k + 1
    f = factors("step", 326)  # the ImageNet script's 326 epochs (K = 1M) reach both steps
    assert f[0] == 1.0 and f[198] == 1.0
    assert f[199] == pytest.approx(0.1) and f[298] == pytest.approx(0.1)
    assert f[299] == pytest.approx(0.01) and f[325] == pytest.approx(0.01)
    reference = [0.1 ** ((e >= 200) + (e >= 300)) for e in range(1, 327)]
    assert f == pytest.approx(reference)


def test_warmup_then_cosine_and_bad_name():
    f = factors("cosine", 10, warmup_epochs=2)
    assert f[:2] == pytest.approx([1 / 3, 2 / 3])
    assert f[2] == 1.0 and f[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(f[2:], f[3:]))
    with pytest.raises(AttnprobeError, match="cosine"):
        lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "linear", 10)
