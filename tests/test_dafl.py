"""DAFL (issue 12): its losses on hand-computed logits, the generator's geometry, and `attnprobe dafl` end to end
(outputs, resume equal to an uninterrupted run, refusals) with an untrained tiny teacher."""
import json
import math

import pytest
import torch

from attnprobe.app.cli import main
from attnprobe.io.checkpoints import read_checkpoint, save_checkpoint
from attnprobe.method.dafl import (
    Generator,
    activation_loss,
    generator_loss,
    information_entropy_loss,
    one_hot_loss,
    teacher_outputs,
    top1_agreement,
)
from attnprobe.models import build_model, describe

from .conftest import CLASSES, TINY_STUDENT, TINY_TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")

# Two rows whose softmax is exact: [1/4, 1/2, 1/4] (argmax 1) and [3/5, 1/5, 1/5] (argmax 0).
LOGITS = torch.tensor([[0.0, math.log(2), 0.0], [math.log(3), 0.0, 0.0]])
P_MEAN = [0.425, 0.35, 0.225]  # the batch mean of those two rows


def test_one_hot_loss_is_cross_entropy_against_each_rows_argmax():
    # -log(1/2) and -log(3/5), averaged over the two rows
    assert one_hot_loss(LOGITS).item() == pytest.approx((math.log(2) + math.log(5 / 3)) / 2, abs=1e-6)


def test_information_entropy_loss_is_of_the_batch_mean_softmax_in_log10():
    expected = sum(p * math.log10(p) for p in P_MEAN)  # -0.46327; the mean of per-row terms would be -0.43212
    assert information_entropy_loss(LOGITS).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(-0.46327, abs=1e-5)
    assert information_entropy_loss(LOGITS, base=math.e).item() == pytest.approx(expected * math.log(10), abs=1e-6)
    # lowest when the batch covers the classes evenly: -log10(3); a one-class batch gives ~0
    assert information_entropy_loss(torch.zeros(4, 3)).item() == pytest.approx(-math.log10(3), abs=1e-6)
    assert information_entropy_loss(torch.tensor([[200.0, 0.0, 0.0]] * 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_activation_loss_and_the_weighted_generator_loss():
    features = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert activation_loss(features).item() == pytest.approx(-2.5)  # -(1 + 2 + 3 + 4) / 4
    g = generator_loss(LOGITS, features)  # DAFL's weights: oh 1, a 0.1, ie 5
    oh, ie = (math.log(2) + math.log(5 / 3)) / 2, sum(p * math.log10(p) for p in P_MEAN)
    assert g["generator"].item() == pytest.approx(oh + 0.1 * -2.5 + 5 * ie, abs=1e-5)
    assert g["one_hot"].item() == pytest.approx(oh, abs=1e-6) and g["activation"].item() == pytest.approx(-2.5)
    g = generator_loss(LOGITS, features, w_oh=0.5, w_a=0.0, w_ie=20.0)
    assert g["generator"].item() == pytest.approx(0.5 * oh + 20 * ie, abs=1e-5)


def test_top1_agreement_counts_rows_with_the_same_argmax():
    student = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    assert top1_agreement(student, LOGITS.repeat(2, 1)[:3]).item() == 2  # argmaxes 1, 0, 0 vs the teacher's 1, 0, 1


def tiny_teacher():
    arch, kwargs = TINY_TEACHER
    torch.manual_seed(0)
    return build_model(arch, kwargs, len(CLASSES)).eval(), arch, kwargs


def test_teacher_outputs_logits_and_pre_head_cls_feature_from_one_pass():
    net, _, _ = tiny_teacher()
    passes = []
    net.blocks[0].register_forward_hook(lambda *a: passes.append(1))
    x = torch.randn(5, 3, 16, 16)
    logits, features = teacher_outputs(net, x)
    assert len(passes) == 1
    assert features.shape == (5, 32)
    assert torch.allclose(features, net.forward_features(x)[:, 0])  # the normed CLS token (fc_norm: identity)
    assert torch.allclose(logits, net(x), atol=1e-6) and torch.allclose(net.head(features), logits, atol=1e-6)


@pytest.mark.parametrize("img_size, in_chans, init", [(28, 1, (7, 7)), (16, 3, (4, 4)), (30, 3, (8, 8))])
def test_generator_makes_normalised_images_of_the_teacher_geometry(img_size, in_chans, init):
    torch.manual_seed(0)
    g = Generator(img_size=img_size, in_chans=in_chans, latent_dim=10)
    assert g.init_size == init  # ceil(side / 4)
    images = g(torch.randn(6, 10))
    assert images.shape == (6, in_chans, img_size, img_size)
    # the last BatchNorm (no affine): each channel at mean 0, std 1 over the batch, as a normalised input
    per_channel = images.transpose(0, 1).reshape(in_chans, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(in_chans), atol=1e-5)
    assert torch.allclose(per_channel.var(1, unbiased=False), torch.ones(in_chans), atol=1e-2)  # v / (v + eps)


# ---- attnprobe dafl end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An untrained tiny teacher (16 px RGB, the three shape classes) saved as train-teacher would."""
    net, arch, kwargs = tiny_teacher()
    path = tmp_path_factory.mktemp("dafl_teacher") / "teacher.pt"
    save_checkpoint(path, net, describe(net, arch, kwargs, CLASSES, [0.5] * 3, [0.5] * 3, accuracy=0.5,
                                        role="teacher"))
    return path


def dafl_argv(teacher, out, epochs, *extra):
    arch, kwargs = TINY_STUDENT
    return ["dafl", "--teacher", teacher, "--out", out, "--epochs", epochs, "--iters-per-epoch", 2,
            "--batch-size", 8, "--fidelity-images", 12, "--student", arch, "--model-kwargs",
            *[f"{k}={v}" for k, v in kwargs.items()], "--workers", 0, "--no-progress", *extra]


def rows(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole_run(teacher_file, image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dafl") / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread): the resumed run must sum in the same order
    try:
        assert main([str(a) for a in dafl_argv(teacher_file, out, 2, "--test", image_root / "data/val")]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_dafl_writes_a_run_chosen_on_fidelity(whole_run, capsys):
    metrics = rows(whole_run)
    assert [r["epoch"] for r in metrics] == [0, 1] and [r["steps"] for r in metrics] == [2, 4]
    for r in metrics:
        assert 0 <= r["fidelity"] <= 1 and r["fidelity_n"] == 12 and r["test_n"] == 24
        assert r["generator"] == pytest.approx(r["one_hot"] + 0.1 * r["activation"] + 5 * r["entropy"], abs=1e-6)
    best = max(metrics, key=lambda r: r["fidelity"])  # the first of equals
    info = read_checkpoint(whole_run / "best.pt")["info"]
    assert info["role"] == "student" and info["method"] == "dafl" and info["selected_on"] == "fidelity"
    assert info["best_epoch"] == best["epoch"] and info["fidelity"] == best["fidelity"]
    assert info["accuracy"] == best["test_top1"] and info["steps"] == 4 and info["classes"] == CLASSES
    assert info["img_size"] == 16 and info["in_chans"] == 3 and info["settings"]["temperature"] == 1.0
    last = read_checkpoint(whole_run / "last.pt")
    assert last["epoch"] == 1 and {"generator", "generator_optimizer", "optimizer"} <= set(last)


def test_dafl_resumed_equals_the_uninterrupted_run(whole_run, teacher_file, image_root, tmp_path, capsys):
    out = tmp_path / "parts"
    test = ["--test", image_root / "data/val"]
    assert main([str(a) for a in dafl_argv(teacher_file, out, 1, *test)]) == 0  # constant LR: epochs may grow
    assert main([str(a) for a in dafl_argv(teacher_file, out, 2, *test, "--resume", out / "last.pt")]) == 0
    assert "student: epoch" in capsys.readouterr().out
    assert rows(out) == rows(whole_run)
    a, b = read_checkpoint(out / "last.pt"), read_checkpoint(whole_run / "last.pt")
    for part in ("model", "generator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


def test_dafl_refusals_are_one_line(teacher_file, whole_run, tmp_path, capsys):
    for argv, words in [(dafl_argv(teacher_file, tmp_path / "R", 1, "--w-ie", "-1"), ["--w-ie -1.0", "0 or more"]),
                        (dafl_argv(tmp_path / "none.pt", tmp_path / "R", 1), ["none.pt"]),
                        (dafl_argv(teacher_file, whole_run, 2, "--w-a", "0.5", "--resume", whole_run / "last.pt"),
                         ["--w-a 0.1", "--w-a 0.5"])]:
        before = (whole_run / "metrics.jsonl").read_text()
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attnprobe dafl: error:"), lines
        assert all(w in lines[0] for w in words), lines[0]
        assert (whole_run / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "R").exists()
