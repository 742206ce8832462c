"""timm <-> Hugging Face transformers: the ViT/DeiT weight names and configuration, both ways.

Pure functions on state dicts and config dicts; transformers itself is not needed to convert, only
to check an export. The names are transformers' on-disk ones (`vit.encoder.layer.N.attention.attention.query`,
what `save_pretrained` writes and the Hub holds); transformers 5's in-memory names
(`vit.layers.N.attention.q_proj`) are read too.

    transformers                       timm
    embeddings.cls_token               cls_token
    embeddings.distillation_token      dist_token (DeiT with teacher head) or reg_token (DeiT, one head)
    embeddings.position_embeddings     pos_embed
    embeddings.patch_embeddings.projection   patch_embed.proj
    layer.N.attention.attention.{query,key,value}  blocks.N.attn.qkv (concatenated q, k, v)
    layer.N.attention.output.dense     blocks.N.attn.proj
    layer.N.layernorm_before / _after  blocks.N.norm1 / norm2
    layer.N.intermediate.dense         blocks.N.mlp.fc1
    layer.N.output.dense               blocks.N.mlp.fc2
    layernorm                          norm
    classifier / cls_classifier        head
    distillation_classifier            head_dist
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import AttnprobeError

HF_VIT_EPS = 1e-12  # transformers' ViT/DeiT layer_norm_eps default (timm's is 1e-6)

_BLOCK = (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
          ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
_STEM = (("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
         ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
         ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
         ("norm.weight", "layernorm.weight"), ("norm.bias", "layernorm.bias"))
# transformers 5 in-memory names -> on-disk names
_V5_NAMES = ((r"\.layers\.(\d+)\.", r".encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
             (r"attention\.k_proj", "attention.attention.key"), (r"attention\.v_proj", "attention.attention.value"),
             (r"attention\.o_proj", "attention.output.dense"), (r"\.mlp\.fc1", ".intermediate.dense"),
             (r"\.mlp\.fc2", ".output.dense"))
_UNUSED = ("embeddings.mask_token", "pooler.")  # parts of transformers models that classification never reads


def _on_disk_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in _V5_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def transformers_to_timm(config: dict, state: dict) -> tuple[str, dict, dict, dict]:
    """A transformers ViT/DeiT image classifier -> (timm arch, model kwargs, timm state dict, extras).

    extras: `classes` (from id2label, or None), `layer_norm_eps`. Raises AttnprobeError for what timm's
    ViT cannot express (another activation, a missing head)."""
    model_type = config.get("model_type")
    if model_type not in ("vit", "deit"):
        raise AttnprobeError(f"transformers model_type {model_type!r} is not a ViT; import a 'vit' or 'deit' "
                             "image classifier")
    if config.get("hidden_act", "gelu") != "gelu":
        raise AttnprobeError(f"hidden_act {config['hidden_act']!r} has no timm ViT equivalent (timm uses exact gelu)")
    state = _on_disk_names(state)
    prefix = model_type + "."
    src = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    hidden, depth = int(config["hidden_size"]), int(config["num_hidden_layers"])
    kwargs = {
        "img_size": config.get("image_size", 224), "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3), "embed_dim": hidden, "depth": depth,
        "num_heads": int(config["num_attention_heads"]),
        "mlp_ratio": int(config.get("intermediate_size", 4 * hidden)) / hidden,
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    _check_config_fits(config, kwargs, src)
    out = {}
    pairs = list(_STEM)
    if "embeddings.distillation_token" in src:
        if "cls_classifier.weight" in src:  # DeiTForImageClassificationWithTeacher: two heads, averaged
            arch = "deit_base_distilled_patch16_224"
            pairs += [("dist_token", "embeddings.distillation_token"), ("head.weight", "cls_classifier.weight"),
                      ("head.bias", "cls_classifier.bias"), ("head_dist.weight", "distillation_classifier.weight"),
                      ("head_dist.bias", "distillation_classifier.bias")]
        else:  # DeiTForImageClassification: the distillation token is there, but only the CLS head is read
            arch = "vit_base_patch16_224"
            kwargs["reg_tokens"] = 1
            pairs += [("reg_token", "embeddings.distillation_token"), ("head.weight", "classifier.weight"),
                      ("head.bias", "classifier.bias")]
    else:
        arch = "vit_base_patch16_224"
        pairs += [("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")]
    for i in range(depth):
        pairs += [(f"blocks.{i}.{t}.{p}", f"encoder.layer.{i}.{h}.{p}") for t, h in _BLOCK for p in ("weight", "bias")]
    for timm_key, hf_key in pairs:
        if hf_key not in src:
            raise AttnprobeError(f"the transformers weights have no {prefix}{hf_key}; is this a "
                                 f"{model_type.upper()} image classifier saved with save_pretrained?")
        out[timm_key] = src.pop(hf_key)
    for i in range(depth):
        for p in ("weight", "bias") if kwargs["qkv_bias"] else ("weight",):
            parts = [src.pop(f"encoder.layer.{i}.attention.attention.{n}.{p}", None) for n in ("query", "key", "value")]
            if any(t is None for t in parts):
                raise AttnprobeError(f"the transformers weights lack layer {i}'s query/key/value {p}")
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, 0)
    left = [k for k in src if not k.startswith(_UNUSED)]
    if left:
        raise AttnprobeError(f"{len(left)} transformers weights have no timm ViT equivalent (e.g. {left[0]}); "
                             "only plain ViT/DeiT image classifiers can be imported")
    classes = _id2label_classes(config, out["head.weight"].shape[0])
    return arch, kwargs, out, {"classes": classes, "layer_norm_eps": float(config.get("layer_norm_eps", HF_VIT_EPS))}


def _check_config_fits(config: dict, kwargs: dict, src: dict) -> None:
    """config.json against the shapes of its own weights: a config that disagrees with them is named as such."""
    def shape(key):
        return tuple(src[key].shape) if key in src else None
    layers = {int(m.group(1)) for k in src for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m}
    hidden, p, c = kwargs["embed_dim"], kwargs["patch_size"], kwargs["in_chans"]
    img = kwargs["img_size"]
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    p_h, p_w = (p, p) if isinstance(p, int) else tuple(p)
    pos, proj = shape("embeddings.position_embeddings"), shape("embeddings.patch_embeddings.projection.weight")
    fc1 = shape("encoder.layer.0.intermediate.dense.weight")
    prefix = 2 if "embeddings.distillation_token" in src else 1
    checks = [("num_hidden_layers", kwargs["depth"], len(layers), "layers"),
              ("hidden_size", hidden, shape("embeddings.cls_token") and shape("embeddings.cls_token")[-1],
               "channels in embeddings.cls_token"),
              ("num_channels", c, proj and proj[1], "input channels of the patch projection"),
              ("patch_size", [p_h, p_w], proj and list(proj[2:]), "as the patch projection's kernel"),
              ("image_size", (h // p_h) * (w // p_w) + prefix, pos and pos[1],
               "position embeddings (patches + prefix tokens)"),
              ("intermediate_size", round(kwargs["mlp_ratio"] * hidden), fc1 and fc1[0], "MLP units in layer 0")]
    for name, says, weights, what in checks:
        if weights and says != weights:
            raise AttnprobeError(f"config.json disagrees with its weights: {name} is {config.get(name)}, which needs "
                                 f"{says} {what}, but the weights have {weights}; re-save the model with "
                                 "save_pretrained, or correct config.json")


def _id2label_classes(config: dict, num_classes: int) -> list[str] | None:
    """Class names from id2label, unless they are transformers' placeholders (LABEL_0, ...). Names of
    another count than the head are returned as they are: the caller refuses them."""
    try:
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise AttnprobeError("config.json's id2label is not a map of class indices to names; correct it, or "
                             "delete it and pass --classes") from None
    if not id2label or all(n == f"LABEL_{i}" for i, n in id2label.items()):
        return None
    if sorted(id2label) != list(range(len(id2label))):
        raise AttnprobeError(f"config.json's id2label has indices {sorted(id2label)[:6]}, not 0..{len(id2label) - 1}; "
                             "correct it, or delete it and pass --classes")
    return [id2label[i] for i in range(len(id2label))]


def timm_to_transformers(model: nn.Module, info: dict) -> tuple[dict, dict]:
    """A timm ViT (with its attnprobe info) -> (transformers config dict, on-disk state dict).

    Plain ViTs become ViTForImageClassification, DeiT distilled models DeiTForImageClassificationWithTeacher,
    and a ViT with one register token DeiTForImageClassification (the way it was imported).
    Raises AttnprobeError for what transformers' ViT cannot express."""
    model = getattr(model, "module", model)
    distilled = getattr(model, "dist_token", None) is not None
    one_register = getattr(model, "num_reg_tokens", 0) == 1
    problems = []
    if getattr(model, "num_reg_tokens", 0) > 1 or getattr(model, "no_embed_class", False):
        problems.append("register tokens or class-free position embeddings")
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool={model.global_pool!r} (transformers reads the CLS token)")
    for act in model.modules():
        if isinstance(act, nn.GELU) and act.approximate != "none" or isinstance(act, (nn.SiLU, nn.ReLU)):
            problems.append(f"activation {act}")
            break
    if problems:
        raise AttnprobeError(f"{info['arch']} cannot be written as a transformers ViT ({problems[0]}); "
                             "export --format timm or onnx instead")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = "deit." if distilled or one_register else "vit."
    out = {}
    pairs = [(t, prefix + h) for t, h in _STEM]
    if one_register:
        pairs += [("reg_token", prefix + "embeddings.distillation_token")]
    if distilled:
        pairs += [("dist_token", prefix + "embeddings.distillation_token"), ("head.weight", "cls_classifier.weight"),
                  ("head.bias", "cls_classifier.bias"), ("head_dist.weight", "distillation_classifier.weight"),
                  ("head_dist.bias", "distillation_classifier.bias")]
    else:
        pairs += [("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")]
    depth = len(model.blocks)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{t}.{p}", f"{prefix}encoder.layer.{i}.{h}.{p}") for t, h in _BLOCK
                  for p in ("weight", "bias")]
        for p in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{p}" in state:
                for name, part in zip(("query", "key", "value"), state.pop(f"blocks.{i}.attn.qkv.{p}").chunk(3, 0)):
                    out[f"{prefix}encoder.layer.{i}.attention.attention.{name}.{p}"] = part.contiguous()
    for timm_key, hf_key in pairs:
        if timm_key not in state:
            raise AttnprobeError(f"{info['arch']} has no {timm_key}; it cannot be written as a transformers ViT")
        out[hf_key] = state.pop(timm_key)
    if state:
        raise AttnprobeError(f"{info['arch']} cannot be written as a transformers ViT ({len(state)} weights without "
                             f"an equivalent, e.g. {next(iter(state))}); export --format timm or onnx instead")
    blk = model.blocks[0]
    img = model.patch_embed.img_size
    classes = info["classes"]
    architecture = ("DeiTForImageClassificationWithTeacher" if distilled else
                    "DeiTForImageClassification" if one_register else "ViTForImageClassification")
    config = {
        "architectures": [architecture], "model_type": "vit" if prefix == "vit." else "deit",
        "hidden_size": model.embed_dim, "num_hidden_layers": depth, "num_attention_heads": blk.attn.num_heads,
        "intermediate_size": blk.mlp.fc1.out_features, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": float(model.norm.eps), "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": model.patch_embed.patch_size[0], "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": blk.attn.qkv.bias is not None, "encoder_stride": model.patch_embed.patch_size[0],
        "id2label": {str(i): name for i, name in enumerate(classes)},
        "label2id": {name: i for i, name in enumerate(classes)},
    }
    return config, out
