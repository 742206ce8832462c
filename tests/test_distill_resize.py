"""distill(resize=...): the wild images are stretched or cropped as asked, labeled ones always cropped."""
import pandas as pd
import pytest
import torch

import attnprobe
from attnprobe.errors import AttnprobeError
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.tables import write_table
from attnprobe.stages import distill_data as train_mod

from .conftest import TINY_STUDENT


def test_distill_stretches_wild_images_only(image_root, teacher_ckpt, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    wild = image_root / "wild"
    paths = sorted(p.relative_to(wild).as_posix() for p in wild.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    write_table(pd.DataFrame({"path": paths}), tmp_path / "sel.parquet", {})
    calls = []
    real = train_mod.train_transform

    def spy(info, flip=True, affine=False, *, resize="crop"):
        calls.append(resize)
        return real(info, flip, affine, resize=resize)
    monkeypatch.setattr(train_mod, "train_transform", spy)
    arch, kwargs = TINY_STUDENT
    info = attnprobe.distill(teacher_ckpt, wild, tmp_path / "sel.parquet", test=image_root / "data", student=arch,
                             model_kwargs=kwargs, epochs=1, out=tmp_path / "run", batch_size=16, workers=0, progress=False,
                             labeled=image_root / "data", per_class=2, resize="stretch",
                             no_decode_cache=True)  # today's path; the decoded one: test_decoded_distill.py
    assert calls == ["stretch", "crop"]  # the wild selection, then the mixed-in labeled images
    assert info["resize"] == "stretch"
    assert read_checkpoint(tmp_path / "run" / "best.pt")["info"]["resize"] == "stretch"
    with pytest.raises(AttnprobeError, match="--resize squash is not one of crop, stretch"):
        attnprobe.distill(teacher_ckpt, wild, tmp_path / "sel.parquet", test=image_root / "data", student=arch,
                          model_kwargs=kwargs, epochs=1, out=tmp_path / "bad", workers=0, progress=False, resize="squash")
    assert not (tmp_path / "bad").exists()
