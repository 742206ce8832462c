"""What both reports draw: a figure saved as PNG (beside the report and embedded in it), an image thumbnail
and the attention-probe heatmaps over the images as the teacher saw them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..io.atomic import replacing
from ..io.checkpoints import load_checkpoint
from ..io.images import eval_transform, load_image
from ..method.probe import BlockTaps


def png(fig: Figure, path: Path) -> str:
    """Save `fig` as `path` (whole or not at all) and return the PNG as base64, for an embedded <img>."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with replacing(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def thumb(ax, path, title=None, color=None, *, in_chans: int = 1, size: int = 160) -> None:
    """One image, shrunk to at most `size` pixels, grey (in_chans 1) or colour; a file that cannot be read
    any more is an empty square saying so. `color` frames it, `title` goes above it."""
    try:
        img = load_image(path, in_chans, size_hint=size)
        img.thumbnail((size, size))
        ax.imshow(img, **({"cmap": "gray", "vmin": 0, "vmax": 255} if in_chans == 1 else {}))
    except Exception as e:  # moved or changed since it was scored: the figure still shows the others
        ax.text(0.5, 0.5, f"unreadable\n{type(e).__name__}", ha="center", va="center", fontsize=6,
                transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    if color:
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2.5)
    if title:
        ax.set_title(title, fontsize=7)


@torch.no_grad()
def fig_attention(teacher_ckpt, wild: Path, paths: list[str], labels: list[str], blocks: list[int],
                  resize: str = "crop", title: str | None = None) -> Figure:
    """The attention probe (head 0's CLS attention over patches) at each probed block, over the image as the
    teacher saw it (brought to its input by `resize`, as the scores were: `crop` or `stretch`)."""
    model, info = load_checkpoint(teacher_ckpt, teacher=True)
    x = torch.stack([eval_transform(info, resize=resize)(load_image(wild / p, info["in_chans"])) for p in paths])
    with BlockTaps(model, qkv_blocks=blocks) as taps:
        model(x)
        maps = [taps.cls_attention(b)[:, 0, model.num_prefix_tokens:] for b in blocks]
    mean, std = torch.tensor(info["mean"])[:, None, None], torch.tensor(info["std"])[:, None, None]
    seen = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # the teacher's input, un-normalised
    gray = seen.shape[-1] == 1
    grid = model.patch_embed.grid_size
    fig = Figure(figsize=(1.6 * (1 + len(blocks)), 1.6 * len(paths)), layout="constrained")
    axes = fig.subplots(len(paths), 1 + len(blocks), squeeze=False)
    for i, p in enumerate(paths):
        img = seen[i][..., 0] if gray else seen[i]
        for j, ax in enumerate(axes[i]):
            ax.imshow(img, cmap="gray" if gray else None, vmin=0, vmax=1, extent=(0, 1, 1, 0))
            if j:
                ax.imshow(maps[j - 1][i].reshape(grid).numpy(), cmap="inferno", alpha=0.6, extent=(0, 1, 1, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"block {blocks[j - 1]}" if j else "teacher's input", fontsize=8)
        axes[i][0].set_ylabel(labels[i], fontsize=8)
    fig.suptitle(title or "Attention probe: CLS attention over patches (head 0)", fontsize=10)
    return fig
