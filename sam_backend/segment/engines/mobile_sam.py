"""MobileSAM (`vit_t`): the TinyViT-5M image encoder of the `mobile_sam` package under segment-anything's own
`Sam`, prompt encoder and mask decoder.

MobileSAM keeps SAM's prompt encoder and mask decoder unchanged and distils the image encoder into a TinyViT
(10.1 M parameters in all, Apache-2.0). Its checkpoint is a plain state dict with segment-anything's tensor names
for the prompt encoder and mask decoder, and TinyViT's (`image_encoder.patch_embed.seq.*`, `image_encoder.layers.*`)
for the encoder, so the same `SamEngine` serves it: features `(1, 256, 64, 64)` from a 1024² input, low-res logits
`(256, 256)`. The TinyViT module comes from `mobile_sam` (PyPI `mobilesam-mirror`, the upstream code file for
file; it needs `timm`), the rest from segment-anything, so every path of the SAM engine (ONNX decoder, compact
embeddings, bench) applies unchanged.
"""

from __future__ import annotations

import warnings

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from sam_backend.segment.engines import EngineError

IMG_SIZE = 1024
PROMPT_DIM = 256
# The one tensor name that tells a TinyViT encoder from a ViT one (ViT's is `image_encoder.patch_embed.proj.weight`).
TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"


def is_mobile_sam(state: dict[str, torch.Tensor]) -> bool:
    """Whether a SAM-shaped state dict has MobileSAM's TinyViT image encoder."""
    return TINY_VIT_KEY in state


def _tiny_vit_class() -> type[torch.nn.Module]:
    """`mobile_sam.modeling.TinyViT`, imported without the deprecation warnings its `timm` imports print."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            from mobile_sam.modeling import TinyViT
    except ImportError as exc:
        raise EngineError(f"MobileSAM (vit_t) needs the `mobilesam-mirror` and `timm` packages: {exc}") from None
    return TinyViT


def build_mobile_sam() -> Sam:
    """MobileSAM with random weights, in eval mode: TinyViT-5M (embed dims 64/128/160/320, depths 2/2/6/2) as
    `mobile_sam.build_sam_vit_t` builds it, then segment-anything's prompt encoder and mask decoder."""
    tiny_vit = _tiny_vit_class()
    grid = IMG_SIZE // 16
    encoder = tiny_vit(img_size=IMG_SIZE, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                       depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                       drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                       local_conv_size=3, layer_lr_decay=0.8)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid),
                                     input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048,
                                                               num_heads=8),
                                 transformer_dim=PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()
