"""Shared fixtures: a tiny real SAM checkpoint, synthetic scenes, the captured Label Studio requests."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

ROOT = TESTS.parent


def require_or_skip(reason: str) -> None:
    """Skip where a system package is missing, but fail under CI=true: there `make test` installs it, so its
    absence is a broken install that must not pass as green."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)

PROTOCOL = ROOT.parent / "shared" / "ls-protocol"
if not PROTOCOL.is_dir():
    PROTOCOL = TESTS / "fixtures" / "ls-protocol"


def load_request(name: str) -> dict:
    """Body of one captured Label Studio request (`../shared/ls-protocol/<name>.request.json`)."""
    return json.loads((PROTOCOL / f"{name}.request.json").read_text())["body"]


def build_tiny_sam(seed: int = 0):
    """A small SAM from segment-anything's own modules, seeded random weights.

    Image encoder: 256 px input, patch 16 (a 16 x 16 grid), embed dim 64, depth 2, 2 heads,
    block 1 global and block 0 windowed (window 8); prompt dim 64; the real PromptEncoder,
    MaskDecoder and TwoWayTransformer (depth 2, 8 heads). About 0.6 M parameters.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim = 64
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, out_chans=dim,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=8, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=128, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=64,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path of a saved tiny SAM state dict (`torch.save`), loaded by tests through the production path."""
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from sam_backend.segment.engines.sam import SamEngine

    return SamEngine.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
