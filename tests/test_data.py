"""The decoded-image cache and the digits augmentation of data.py."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from attnprobe.errors import AttnprobeError
from attnprobe.io.datasets import ImageList, labeled_folder
from attnprobe.io.images import eval_transform, train_transform


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(path)


def test_cached_images_are_read_from_disk_once(tmp_path):
    for c in ("a", "b"):
        _write(tmp_path / c / "x.png", 10)
    to_tensor = transforms.PILToTensor()
    cached = labeled_folder(tmp_path, ["a", "b"], to_tensor, 1, cache=True)
    plain = labeled_folder(tmp_path, ["a", "b"], to_tensor, 1)
    listed = ImageList([str(tmp_path / "a" / "x.png")], transform=to_tensor, in_chans=1, cache=True)
    assert cached[0][0].unique().tolist() == [10] and listed[0][0].unique().tolist() == [10]
    _write(tmp_path / "a" / "x.png", 200)  # the file changes after the first epoch read it
    assert cached[0][0].unique().tolist() == [10] and listed[0][0].unique().tolist() == [10]
    assert plain[0][0].unique().tolist() == [200]
    assert cached[1][1] == 1 and cached[1][0].unique().tolist() == [10]


def test_affine_replaces_the_padded_crop():
    info = {"img_size": 28, "mean": [0.5], "std": [0.5]}
    kinds = lambda t: [type(s).__name__ for s in t.transforms]
    assert "RandomCrop" in kinds(train_transform(info, flip=False))
    digits = kinds(train_transform(info, flip=False, affine=True))
    assert "RandomAffine" in digits and "RandomCrop" not in digits and "RandomHorizontalFlip" not in digits
    # the jitter is small (10 degrees, 8% shift, 10% scale): a centred 8x8 stroke stays clear of a 4-pixel border
    img = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 10), mode="L")
    t = train_transform(info, flip=False, affine=True)
    torch.manual_seed(0)
    for _ in range(20):
        x = t(img)[0]
        assert (x[:4] == -1).all() and (x[-4:] == -1).all() and (x[:, :4] == -1).all() and (x[:, -4:] == -1).all()


def _edges_image(width=40, height=20):
    """width x height, gray (128), with a black band over the left fifth and a white band over the right fifth."""
    a = np.full((height, width), 128, np.uint8)
    a[:, :width // 5] = 0
    a[:, -(width // 5):] = 255
    return Image.fromarray(a, mode="L")


def test_stretch_keeps_the_whole_image_crop_keeps_its_centre():
    info = {"img_size": 32, "mean": [0.0], "std": [1.0]}  # identity normalisation: the pixels in 0..1
    img = _edges_image()
    gray = 128 / 255
    stretched = eval_transform(info, resize="stretch")(img)[0]
    cropped = eval_transform(info)(img)[0]
    assert stretched.shape == cropped.shape == (32, 32)
    # stretch: 40 columns squeezed into 32 (x0.8), 20 rows into 32: both bands stay, at the left and right
    assert (stretched[:, :6] == 0).all() and (stretched[:, 26:] == 1).all()
    assert torch.allclose(stretched[:, 8:24], torch.tensor(gray))
    # crop: the shorter side 20 -> 32 makes it 64 x 32 (x1.6); the centre 32 columns are original
    # columns 10..30, all gray: both bands are cut away
    assert torch.allclose(cropped, torch.tensor(gray))
    # an image that is already square comes out the same either way
    square = img.resize((20, 20))
    assert torch.equal(eval_transform(info, resize="stretch")(square), eval_transform(info)(square))


def test_train_transform_stretch_and_bad_resize():
    info = {"img_size": 32, "mean": [0.0], "std": [1.0]}
    kinds = lambda t: [type(s).__name__ for s in t.transforms]
    assert kinds(train_transform(info, flip=False, resize="stretch"))[:2] == ["Resize", "RandomCrop"]
    assert kinds(train_transform(info, flip=False))[:3] == ["Resize", "CenterCrop", "RandomCrop"]
    torch.manual_seed(0)
    x = train_transform(info, flip=False, resize="stretch")(_edges_image())[0]
    assert x.shape == (32, 32)
    for bad in ("squash", "Stretch", None):
        with pytest.raises(AttnprobeError, match=r"'crop', 'stretch'"):
            eval_transform(info, resize=bad)
        with pytest.raises(AttnprobeError, match=r"'crop', 'stretch'"):
            train_transform(info, resize=bad)
