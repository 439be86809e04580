"""Vision Transformer helpers: build a timm ViT, and read its attention without patching it.

``build_vit`` creates a timm ``VisionTransformer`` with a new classification head, honouring
``pretrained`` the way every backbone of the harness does (True = timm's weights, a str = a
local weights file, False = random initialisation).

``vit_forward_with_attention`` runs the model's own forward pass once and returns, besides the
logits, the CLS-to-patch attention of every layer and head and the final patch tokens before
the last LayerNorm. The attention is recomputed from each block's own ``qkv`` projection
(``softmax(q k^T * scale)``), from the block's attention input captured by a forward pre-hook
on ``block.attn``, so it works whether timm uses the fused ``scaled_dot_product_attention``
kernel or not, without monkey-patching. Hooks are removed even when the forward pass raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: Short names accepted by ``build_vit`` and the timm models they stand for.
VIT_NAMES = {"tiny": "deit_tiny_patch16_224", "small": "vit_small_patch16_224"}
#: Hybrid ViTs (a pretrained CNN trunk as patch embedding) and the timm trunk of each.
HYBRID_TRUNKS = {"lite0_hybrid": "tf_efficientnet_lite0"}
#: Transformer defaults of a hybrid: depth, token width, heads (DeiT-tiny's width and heads).
HYBRID_DEFAULTS = {"depth": 4, "embed_dim": 192, "num_heads": 3}


def build_hybrid_vit(
    name: str,
    pretrained: bool | str = False,
    num_classes: int = 1000,
    img_size: int = 224,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
) -> nn.Module:
    """A hybrid ViT: a CNN trunk to stride 16 as patch embedding, then transformer blocks.

    The construction of Dosovitskiy et al. ("An Image is Worth 16x16 Words", ICLR 2021,
    section 3.1, "Hybrid Architecture"): the input sequence is the trunk's feature map
    projected by a 1x1 convolution (timm ``HybridEmbed``, patch size 1 on the feature map), a
    CLS token and learned position embeddings are added, and ``depth`` pre-norm blocks follow.
    The trunk is the whole EfficientNet-Lite0 with its stride-32 stage dilated (output stride
    16, 320 channels), so one token covers 16 x 16 pixels as in DeiT. Only the trunk can be
    pretrained (``pretrained`` is the trunk's, see :mod:`methods.common.weights`); the
    projection, tokens and blocks start from random init and are trained by the caller.

    Returns:
        A timm ``VisionTransformer`` (``blocks``, ``norm``, ``head``, ``patch_embed``) whose
        ``input_norm`` is the trunk's normalisation.
    """
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_hybrid import HybridEmbed

    from methods.common.backbones import create_backbone

    if name not in HYBRID_TRUNKS:
        raise ValueError(f"unknown hybrid ViT {name!r}; valid: {sorted(HYBRID_TRUNKS)}")
    trunk = create_backbone(HYBRID_TRUNKS[name], pretrained, output_stride=16, out_indices=(4,))
    model = VisionTransformer(
        img_size=img_size,
        patch_size=1,
        num_classes=num_classes,
        embed_dim=embed_dim or HYBRID_DEFAULTS["embed_dim"],
        depth=depth or HYBRID_DEFAULTS["depth"],
        num_heads=num_heads or HYBRID_DEFAULTS["num_heads"],
        embed_layer=partial(HybridEmbed, backbone=trunk),
    )
    model.input_norm = trunk.input_norm
    return model


def vit_input_norm(name: str) -> Any:
    """The input normalisation of ViT ``name`` (a hybrid's: its trunk's weights')."""
    from methods.common.backbones import backbone_normalization

    return backbone_normalization(HYBRID_TRUNKS.get(name) or VIT_NAMES.get(name, name))


def trunk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The pretrained CNN trunk's parameters of a hybrid ViT (none for a plain ViT)."""
    trunk = getattr(model.patch_embed, "backbone", None)
    return list(trunk.parameters()) if trunk is not None else []


def build_vit(
    name: str,
    pretrained: bool | str = False,
    num_classes: int = 1000,
    img_size: int = 224,
    **arch: Any,
) -> nn.Module:
    """Create a timm Vision Transformer with a fresh ``num_classes`` head.

    Pretrained weights go through :func:`methods.common.backbones.create_vit` (one clear
    :class:`~methods.common.backbones.PretrainedWeightsError` when offline or the file is
    missing); architecture overrides (used by the ``tiny`` preset) need random init.

    Args:
        name: a timm model name, a short name from ``VIT_NAMES`` (``tiny``, ``small``), or a
            hybrid from ``HYBRID_TRUNKS`` (``lite0_hybrid``: :func:`build_hybrid_vit`, where
            ``pretrained`` is the trunk's and ``depth``/``embed_dim``/``num_heads`` apply).
        pretrained: True for timm's pretrained weights (needs internet or a filled local
            cache), a path to a local weights file, or False for random initialisation.
        num_classes: size of the new linear classification head.
        img_size: input resolution; timm resamples the position embedding of pretrained
            weights to it.
        **arch: architecture overrides passed to timm (``depth``, ``embed_dim``,
            ``num_heads``); None values are ignored; only with ``pretrained=False``.

    Returns:
        The timm model (in train mode, on the CPU).

    Raises:
        ValueError: on architecture overrides together with pretrained weights.
    """
    import timm

    from methods.common.backbones import backbone_normalization, create_vit

    if name in HYBRID_TRUNKS:
        arch.pop("patch_size", None)
        return build_hybrid_vit(name, pretrained, num_classes, img_size, **arch)
    model_name = VIT_NAMES.get(name, name)
    arch = {k: v for k, v in arch.items() if v is not None}
    if not arch:
        model = create_vit(model_name, pretrained, num_classes=num_classes, img_size=img_size)
        model.input_norm = backbone_normalization(model_name)
        return model
    if pretrained is not False and pretrained is not None:
        raise ValueError(
            f"ViT {model_name}: architecture overrides {sorted(arch)} cannot be combined with "
            "pretrained weights; use pretrained=False"
        )
    model = timm.create_model(
        model_name, pretrained=False, num_classes=num_classes, img_size=img_size, **arch
    )
    model.input_norm = backbone_normalization(model_name)
    return model


@dataclass
class ViTOutputs:
    """What one forward pass of a ViT gives FineCAM-style methods.

    Attributes:
        logits: (N, C) class scores of the model's own head.
        cls_attn: (N, L, H, P) CLS-to-patch attention of every layer l and head h (softmax
            over all tokens, then the prefix-token columns dropped).
        tokens: (N, P, D) final patch tokens before the last LayerNorm.
        grid: (gh, gw) the patch grid, gh * gw = P.
    """

    logits: torch.Tensor
    cls_attn: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int]

    def token_map(self) -> torch.Tensor:
        """The patch tokens as a feature map (N, D, gh, gw)."""
        n, p, d = self.tokens.shape
        return self.tokens.transpose(1, 2).reshape(n, d, *self.grid)


def cls_attention(attn: nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """CLS-to-patch attention of one timm ``Attention`` module, from its own weights.

    Args:
        attn: a timm ``Attention`` (has ``qkv``, ``num_heads``, ``head_dim``, ``scale``).
        x: (N, T, D) the module's input (the block's ``norm1`` output).
        num_prefix: number of prefix tokens (CLS, distillation, registers); token 0 is CLS.

    Returns:
        (N, H, T - num_prefix) the softmax attention of the CLS query over the patch keys.
    """
    for attr in ("qkv", "num_heads", "head_dim", "scale"):
        if not hasattr(attn, attr):
            raise TypeError(
                f"{type(attn).__name__} has no {attr!r}: only timm Attention modules with a "
                "fused qkv projection are supported"
            )
    n, t, _ = x.shape
    # Only the CLS query and the keys are needed: project with the q and k rows of the fused
    # weight instead of the whole qkv (which would redo 3x the keys' work for every token).
    inner = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], weight[:inner], None if bias is None else bias[:inner])
    k = F.linear(x, weight[inner : 2 * inner], None if bias is None else bias[inner : 2 * inner])
    q = q.reshape(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (N, H, 1, hd)
    k = k.reshape(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # (N, H, T, hd)
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (N, H, 1, T)
    return scores.softmax(dim=-1)[:, :, 0, num_prefix:]  # (N, H, P)


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def vit_forward_with_attention(model: nn.Module, x: torch.Tensor) -> ViTOutputs:
    """Run ``model(x)`` once and capture CLS attention of every block and pre-LN tokens.

    Args:
        model: a timm ``VisionTransformer`` (``blocks``, ``norm``, ``patch_embed``).
        x: (N, 3, H, W) normalised images; H, W multiples of the patch size.

    Returns:
        The logits, CLS-to-patch attention (N, L, H, P), pre-LN patch tokens (N, P, D) and
        the patch grid.
    """
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))  # patches or trunk
    attentions: list[torch.Tensor] = []
    captured: dict[str, torch.Tensor] = {}

    def attn_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        attentions.append(cls_attention(module, args[0], num_prefix))

    def norm_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured["tokens"] = args[0][:, num_prefix:]

    handles = [blk.attn.register_forward_pre_hook(attn_hook) for blk in model.blocks]
    handles.append(model.norm.register_forward_pre_hook(norm_hook))
    with _hooks(handles):
        logits = model(x)
    if len(attentions) != len(model.blocks) or "tokens" not in captured:
        raise RuntimeError(
            f"captured {len(attentions)} attention maps for {len(model.blocks)} blocks; the "
            "model's forward pass does not go through blocks[i].attn and norm as expected"
        )
    tokens = captured["tokens"]
    if tokens.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(
            f"{tokens.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid"
        )
    return ViTOutputs(
        logits=logits, cls_attn=torch.stack(attentions, dim=1), tokens=tokens, grid=grid
    )


def minmax_shift(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - min) / (max + eps)`` per sample over all but the first dim (the original's form).

    Note the divisor is the max, not max - min: the result lies in [0, 1] only when the min
    is >= 0 (attention); for signed inputs (a class map) it can exceed 1 or turn negative.
    """
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi + eps)


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) maps (align_corners=False); a no-op at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
