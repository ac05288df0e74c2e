"""SAM 2.1 engine (the `sam2` package's Hiera-T/S/B+/L image models).

The model is built from the `sam2` package's own config files (`configs/sam2.1/*.yaml`, never from a
network) with hydra, as `sam2.build_sam.build_sam2` does, and its weights are loaded with
`torch.load(weights_only=True)` and a strict `load_state_dict`. Which config: `SAM_MODEL_TYPE`, or for
another checkpoint the trunk's shape read off its tensors. A smaller SAM 2 saved by the tests carries
its architecture as a few numeric config overrides (allow-listed: nothing in a file can name a class).

`embed` runs the image encoder once: features `image_embed` `(1, 256, 64, 64)`, `high_res_0`
`(1, 32, 256, 256)` and `high_res_1` `(1, 64, 128, 128)` float32 for a 1024 model (≈ 16 MiB), the same
tensors `SAM2ImagePredictor.set_image` keeps. `predict` runs the prompt encoder and mask decoder with
them: box corners go first as points labelled 2 and 3, the previous low-res logits `(256, 256)` as the
mask input, masks are upsampled to the image size and thresholded at 0, as `SAM2ImagePredictor` does.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_backend.segment.checkpoints import checked_file_id, expected_sha256
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import EngineError, MaskPrediction, check_image, stroke_logits
from sam_backend.segment.engines.fast_decoder import FastDecoder
from sam_backend.segment.engines.ids import EngineId
from sam_backend.segment.engines.torch_engine import (
    TorchEngine,
    load_state_dict,
    resolve_device,
    resolve_precision,
)
from sam_backend.segment.geometry import ImageSize

if TYPE_CHECKING:
    from sam_backend.config import Settings
    from sam_backend.segment.prompts import ObjectPrompt

log = logging.getLogger(__name__)

CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# (trunk embed dim, trunk blocks) of the official checkpoints.
TRUNK_SHAPES = {(96, 12): "sam2.1_hiera_tiny", (96, 16): "sam2.1_hiera_small", (112, 24): "sam2.1_hiera_base_plus",
                (144, 48): "sam2.1_hiera_large"}
# What `build_sam2` adds for image prediction: fall back to multimask when a single mask is unstable.
POSTPROCESSING = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
# Overrides a checkpoint may carry: architecture numbers only.
_ALLOWED_OVERRIDE = re.compile(
    r"^\+\+model\.(image_size|image_encoder\.trunk\.(embed_dim|num_heads|stages|global_att_blocks|window_spec"
    r"|window_pos_embed_bkg_spatial_size)|image_encoder\.neck\.(d_model|backbone_channel_list|fpn_top_down_levels)"
    r"|memory_attention\.num_layers|memory_attention\.layer\.dim_feedforward)=\[?[0-9, ]+\]?$")


def build_model(model_type: str, overrides: list[str] | tuple[str, ...] = ()) -> torch.nn.Module:
    """A SAM 2.1 model with random weights from the installed package's config (eval mode)."""
    import sam2  # noqa: F401 - registers the package's configs with hydra
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for o in overrides:
        if not _ALLOWED_OVERRIDE.match(o):
            raise EngineError(f"SAM 2 architecture override {o!r} is not allowed: expected ++model.<size>=<numbers>")
    cfg = compose(config_name=CONFIGS[model_type], overrides=[*POSTPROCESSING, *overrides])
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True).eval()


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """`(state dict, model type from the trunk's shape or None, architecture overrides)` of a SAM 2 file."""
    obj = load_state_dict(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise EngineError(f"{path}: expected a SAM 2 checkpoint (a dict with 'model'), got "
                          f"{type(obj).__name__} with keys {sorted(obj)[:5] if isinstance(obj, dict) else '-'}")
    state = obj["model"]
    extra = obj.get("sam_backend") or {}
    overrides = [str(o) for o in extra.get("overrides", [])] if isinstance(extra, dict) else []
    try:
        dim = int(state["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
        blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k)))
    except (KeyError, ValueError) as exc:
        raise EngineError(f"{path}: not a SAM 2 checkpoint: expected sam2 tensor names ({exc})") from None
    model_type = extra.get("model_type") if isinstance(extra, dict) and extra.get("model_type") in CONFIGS else None
    return state, model_type or TRUNK_SHAPES.get((dim, blocks)), overrides


def load_checked(path: Path, model_type: str | None = None) -> tuple[torch.nn.Module, str]:
    """Build the architecture the file holds and load it strictly; `(model, model type)`."""
    state, found, overrides = read_checkpoint(path)
    if found is None:
        raise EngineError(f"{path}: a SAM 2 trunk of a shape no official model has; expected Hiera-T/S/B+/L")
    if model_type is not None and found != model_type and not overrides:
        raise EngineError(f"{path} holds a {found} model but SAM_MODEL_TYPE={model_type}")
    model = build_model(found, overrides)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EngineError(f"{path} does not fit a {found} SAM 2: {str(exc).splitlines()[0]}") from None
    return model, found


class Sam2DecoderGraph(torch.nn.Module):
    """SAM 2's prompt encoder + mask decoder with tensor inputs only, for export: the points come with their
    padding point (label -1), `has_mask_input` switches the mask prompt, and `predict_masks` gives every mask
    token's low-res logits `(1, T, 256, 256)` and scores `(1, T)` (the engine chooses as `forward` does)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder

    def forward(self, image_embed: torch.Tensor, high_res_0: torch.Tensor, high_res_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.prompt_encoder
        sparse = encoder._embed_points(point_coords, point_labels, pad=False)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        flag = has_mask_input.reshape(1, 1, 1, 1)
        dense = flag * encoder._embed_masks(mask_input) + (1 - flag) * no_mask
        masks, scores, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed, image_pe=encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, repeat_image=False, high_res_features=[high_res_0, high_res_1])
        return masks, scores


class Sam2Engine(TorchEngine):
    """SAM 2.1 behind the `Engine` protocol; safe to share across threads."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, precision: str, weights_id: str) -> None:
        from sam2.utils.transforms import SAM2Transforms

        self.model = model.to(device).eval()
        self.device = device
        self._identity = EngineId.of("sam2", weights_id, precision)
        self.transforms = SAM2Transforms(resolution=self.model.image_size, mask_threshold=0.0)
        self._encode_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> Sam2Engine:
        return cls.from_checkpoint(settings.checkpoint_path,
                                   model_type=settings.model_type if settings.checkpoint is None else None,
                                   device=settings.device, precision=settings.precision,
                                   expected_sha256=expected_sha256(settings))

    @classmethod
    def from_checkpoint(cls, path: Path, *, model_type: str | None = None, device: str = "auto",
                        precision: str = "auto", expected_sha256: str | None = None) -> Sam2Engine:
        """Verify the file where a digest is known (pinned, or recorded at download) and load it strictly."""
        path = Path(path)
        file_id = checked_file_id(path, expected_sha256, label="SAM 2", model_type=model_type or "sam2.1_hiera_tiny",
                                  unverified="Meta publishes none; loading it after a strict shape check")
        model, found = load_checked(path, model_type)
        dev = resolve_device(device)
        weights_id = f"{found}/{file_id[:12]}"
        log.info("loaded SAM 2.1 %s from %s on %s", found, path, dev)
        return cls(model, device=dev, precision=resolve_precision(precision, dev), weights_id=weights_id)

    @classmethod
    def build(cls, model_type: str) -> torch.nn.Module:
        return build_model(model_type)

    # -- Engine protocol ----------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an `(H, W, 3) uint8 RGB` image; see the module docstring for the features."""
        check_image(image)
        writable = image if image.flags.writeable else image.copy()  # torchvision warns on read-only arrays
        pixels = self.transforms(writable)[None].to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with self._encode_lock, torch.inference_mode(), autocast:
            backbone = self.model.forward_image(pixels)
            levels = backbone["backbone_fpn"][-self.model.num_feature_levels:]
            image_embed = levels[-1]
            if self.model.directly_add_no_mem_embed:
                image_embed = image_embed + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        # Contiguous float32: the encoder leaves two of them channels-last, which made every click's decoder
        # read them through strides (ONNX Runtime copied 5 MB per click: 66 ms instead of 38 for Hiera-T).
        features = {"image_embed": image_embed.float().contiguous(), "high_res_0": levels[0].float().contiguous(),
                    "high_res_1": levels[1].float().contiguous()}
        return Embedding(self.engine_id, ImageSize.of(image), features)

    def predict_with(self, decoder: FastDecoder | None, embedding: Embedding, prompt: ObjectPrompt,
                     prev_logits: np.ndarray | None = None) -> MaskPrediction:
        """Masks for one object; a lone first click asks for 3 candidates, later clicks for one seeded with
        the previous low-res logits (4 × the embedding grid). `decoder` None runs the eager prompt encoder and
        mask decoder; a fast one runs `Sam2DecoderGraph`."""
        if embedding.engine_id != self.engine_id:
            raise EngineError(f"embedding from {embedding.engine_id} given to {self.engine_id}")
        orig_hw = embedding.image_size.shape
        multimask = prev_logits is None and prompt.box is None and prompt.stroke is None and len(prompt.points) == 1
        coords: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        if prompt.box is not None:  # box corners first, labelled 2 and 3
            box = torch.as_tensor(prompt.box, dtype=torch.float, device=self.device)
            coords.append(self.transforms.transform_boxes(box, normalize=True, orig_hw=orig_hw))
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=self.device))
        if len(prompt.points):
            pts = torch.as_tensor(prompt.points, dtype=torch.float, device=self.device)
            coords.append(self.transforms.transform_coords(pts, normalize=True, orig_hw=orig_hw)[None])
            labels.append(torch.as_tensor(prompt.labels, dtype=torch.int, device=self.device)[None])
        mask_input = None
        if prev_logits is not None:
            expected = tuple(self.model.sam_prompt_encoder.mask_input_size)
            logits = np.asarray(prev_logits, dtype=np.float32)
            if logits.shape[-2:] != expected:
                raise EngineError(f"prev_logits: expected {expected}, got {logits.shape}")
            mask_input = torch.as_tensor(logits.reshape(1, 1, *expected), device=self.device)
        elif prompt.stroke is not None:  # SAM 2 resizes the image to a square: the stroke follows it
            low = stroke_logits(prompt.stroke, tuple(self.model.sam_prompt_encoder.mask_input_size))
            mask_input = torch.as_tensor(low[None, None], device=self.device)
        features = self._features(embedding)
        points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1))
        if decoder is None:
            with torch.inference_mode():
                sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
                low_res, iou, _, _ = self.model.sam_mask_decoder(
                    image_embeddings=features["image_embed"], image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
                    repeat_image=False, high_res_features=[features["high_res_0"], features["high_res_1"]])
        else:
            low_res, iou = decoder(self._graph_inputs(features, points, mask_input))
            low_res, iou = self._choose(low_res, iou, multimask)
        transforms = self.transforms

        def upsample(i: int) -> np.ndarray:  # only the mask the answer needs goes to full resolution
            with torch.inference_mode():
                return (transforms.postprocess_masks(low_res[:, i:i + 1], orig_hw) > 0.0)[0, 0].cpu().numpy()

        clamped = torch.clamp(low_res, -32.0, 32.0)
        return MaskPrediction(None, iou[0].float().cpu().numpy(), clamped[0].float().cpu().numpy(), upsample)

    def _choose(self, low_res: torch.Tensor, iou: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates `MaskDecoder.forward` keeps of every token's output: 1-3 for multimask, else the
        single-mask token or, where it is unstable, the best multimask one (`dynamic_multimask_via_stability`)."""
        decoder = self.model.sam_mask_decoder
        if multimask:
            return low_res[:, 1:], iou[:, 1:]
        if decoder.dynamic_multimask_via_stability:
            with torch.inference_mode():
                return decoder._dynamic_multimask_via_stability(low_res, iou)
        return low_res[:, 0:1], iou[:, 0:1]

    def _graph_inputs(self, features: dict[str, torch.Tensor], points: tuple[torch.Tensor, torch.Tensor],
                      mask_input: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`Sam2DecoderGraph`'s inputs: the points with the padding point (label -1) the eager prompt encoder
        appends when it gets no box, the mask prompt or zeros with `has_mask_input`, and the features."""
        coords = torch.cat([points[0], torch.zeros(1, 1, 2, device=self.device)], dim=1)
        labels = torch.cat([points[1].float(), -torch.ones(1, 1, device=self.device)], dim=1)
        size = tuple(self.model.sam_prompt_encoder.mask_input_size)
        return {"image_embed": features["image_embed"], "high_res_0": features["high_res_0"],
                "high_res_1": features["high_res_1"], "point_coords": coords, "point_labels": labels,
                "mask_input": mask_input if mask_input is not None else torch.zeros(1, 1, *size, device=self.device),
                "has_mask_input": torch.ones(1, device=self.device) * float(mask_input is not None)}

    def decoder_graph(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Embedding]:
        """`Sam2DecoderGraph` of these weights, example inputs, and an embedding of random features."""
        side = self.model.image_size
        generator = torch.Generator().manual_seed(0)
        dim = self.model.sam_prompt_encoder.embed_dim
        grid = self.model.sam_prompt_encoder.image_embedding_size
        decoder = self.model.sam_mask_decoder
        shapes = {"image_embed": (dim, *grid),
                  "high_res_0": (decoder.conv_s0.out_channels, 4 * grid[0], 4 * grid[1]),
                  "high_res_1": (decoder.conv_s1.out_channels, 2 * grid[0], 2 * grid[1])}
        features = {k: torch.randn(1, *shape, generator=generator).to(self.device) for k, shape in shapes.items()}
        embedding = Embedding(self.engine_id, ImageSize(side, side * 3 // 4), features)
        points = (torch.tensor([[[0.3 * side, 0.4 * side]]], device=self.device),
                  torch.ones(1, 1, dtype=torch.int, device=self.device))
        return Sam2DecoderGraph(self.model).eval(), self._graph_inputs(features, points, None), embedding

    def _features(self, embedding: Embedding) -> dict[str, Any]:
        return {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).to(self.device)
                for k, v in embedding.features.items()}
