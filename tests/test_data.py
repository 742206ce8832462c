"""The decoded-image cache and the digits augmentation of data.py."""
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from attnprobe.data import ImageList, labeled_folder, train_transform


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
