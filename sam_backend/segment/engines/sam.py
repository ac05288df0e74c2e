"""Segment Anything engine (segment-anything's ViT-B/L/H models, and MobileSAM's `vit_t`).

The architecture is read off the checkpoint's tensor shapes (embed dim, depth, heads, global
attention blocks, image size), so the official ViT-B/L/H files and smaller SAM-shaped checkpoints
load through one path: `torch.load(weights_only=True)` then a strict `load_state_dict`.

`embed` runs the image encoder once per image (bf16 autocast where the hardware runs bf16
natively, see `resolve_precision`); `predict` runs the prompt encoder and mask decoder on the
cached features, which costs tens of milliseconds. Both use segment-anything's public pieces
(`ResizeLongestSide`, `Sam.preprocess`, `image_encoder`, `prompt_encoder`, `mask_decoder`,
`postprocess_masks`), the same steps `SamPredictor` takes, without reaching into its fields.
"""

from __future__ import annotations

import collections
import copy
import logging
import re
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.onnx import SamOnnxModel
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from sam_backend.config import MOBILE_SAM
from sam_backend.segment.checkpoints import checked_file_id, expected_sha256
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import EngineError, MaskPrediction, check_image
from sam_backend.segment.engines.fast_decoder import FastDecoder
from sam_backend.segment.engines.ids import EngineId
from sam_backend.segment.engines.mobile_sam import build_mobile_sam, is_mobile_sam
from sam_backend.segment.engines.sam_inputs import (
    answer,
    graph_candidates,
    prompt_arrays,
    prompt_feed,
    wants_candidates,
)
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

# (encoder embed dim, depth) of the official checkpoints.
OFFICIAL_SHAPES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


@dataclass(frozen=True)
class SamArchitecture:
    """Hyper-parameters of a SAM model, as `segment_anything.build_sam` spells them."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_heads: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    num_multimask_outputs: int

    @property
    def name(self) -> str:
        """`vit_b`, `vit_l`, `vit_h`, or `custom-<dim>x<depth>@<img_size>`."""
        official = OFFICIAL_SHAPES.get((self.embed_dim, self.depth))
        if official and self.img_size == 1024:
            return official
        return f"custom-{self.embed_dim}x{self.depth}@{self.img_size}"

    def build(self) -> Sam:
        """A SAM with random weights and this architecture, in eval mode."""
        grid = self.img_size // self.patch_size
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=self.img_size,
                patch_size=self.patch_size,
                embed_dim=self.embed_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                out_chans=self.prompt_dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=self.window_size,
                global_attn_indexes=self.global_attn_indexes,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=self.prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(self.img_size, self.img_size),
                mask_in_chans=self.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=self.num_multimask_outputs,
                transformer=TwoWayTransformer(
                    depth=self.decoder_depth,
                    embedding_dim=self.prompt_dim,
                    mlp_dim=self.decoder_mlp_dim,
                    num_heads=self.decoder_heads,
                ),
                transformer_dim=self.prompt_dim,
                iou_head_depth=self.iou_head_depth,
                iou_head_hidden_dim=self.iou_head_hidden_dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        return sam.eval()

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SamArchitecture:
        """Read the architecture off a SAM state dict's tensor shapes."""
        try:
            pos = state["image_encoder.pos_embed"]  # (1, grid, grid, embed_dim)
            patch = state["image_encoder.patch_embed.proj.weight"].shape[-1]
            grid, embed_dim = pos.shape[1], pos.shape[3]
            depth = 1 + max(_indices(state, r"image_encoder\.blocks\.(\d+)\."))
            head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
            rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
            global_idx = tuple(i for i, n in enumerate(rel) if n == 2 * grid - 1)
            windowed = [n for n in rel if n != 2 * grid - 1]
            mlp_hidden = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
            prompt_dim = state["image_encoder.neck.0.weight"].shape[0]
            mask_in = state["prompt_encoder.mask_downscaling.3.weight"].shape[0]
            dec_depth = 1 + max(_indices(state, r"mask_decoder\.transformer\.layers\.(\d+)\."))
            dec_mlp = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
            iou_depth = 1 + max(_indices(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."))
            iou_hidden = state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
            mask_tokens = state["mask_decoder.mask_tokens.weight"].shape[0]
        except (KeyError, IndexError, ValueError) as exc:
            raise EngineError(f"not a SAM checkpoint: expected segment-anything tensor names, missing {exc}") from None
        return cls(
            img_size=int(grid * patch),
            patch_size=int(patch),
            embed_dim=int(embed_dim),
            depth=int(depth),
            num_heads=int(embed_dim // head_dim),
            mlp_ratio=mlp_hidden / embed_dim,
            global_attn_indexes=global_idx,
            window_size=(windowed[0] + 1) // 2 if windowed else 14,
            prompt_dim=int(prompt_dim),
            mask_in_chans=int(mask_in),
            decoder_depth=int(dec_depth),
            decoder_mlp_dim=int(dec_mlp),
            decoder_heads=8,  # not visible in tensor shapes; every published SAM uses 8
            iou_head_depth=int(iou_depth),
            iou_head_hidden_dim=int(iou_hidden),
            num_multimask_outputs=int(mask_tokens - 1),
        )


class SamDecoderGraph(SamOnnxModel):
    """Prompt encoder + mask decoder with tensor inputs only, for export: segment-anything's `SamOnnxModel`
    prompt embedding (labels -1 pad, 0/1 clicks, 2/3 box corners; `has_mask_input` switches the mask prompt)
    and `MaskDecoder.predict_masks`, without the upsampling to the image: every mask token's low-res logits
    `(1, T, 256, 256)` and scores `(1, T)`.

    The same arithmetic as `predict_masks`, laid out for a CPU graph (batch 1): the transformer's image tokens
    `(h·w, C)` stay pixel-major, each 2 × 2 stride-2 transposed convolution of `output_upscaling` is one matrix
    product per input pixel (its weight `(C_in, C_out, 2, 2)` as `(C_in, 2·2·C_out)`), `LayerNorm2d` is a layer
    norm over the last axis, and the sub-pixels are put in image order once, on the `(T, 256, 256)` logits instead
    of on the 32-channel features. ONNX Runtime ran the masks of MobileSAM in 16.7 ms instead of 19.4 ms (AMD EPYC
    Zen 5, 2 threads): no NCHW transposes and no layer norm spelled out in reductions. Logits agree with
    `predict_masks` to 1e-4."""

    def __init__(self, model: Sam) -> None:
        super().__init__(model, return_single_mask=False)
        first, norm, _, second, _ = model.mask_decoder.output_upscaling
        for conv in (first, second):
            if conv.kernel_size != (2, 2) or conv.stride != (2, 2):
                raise ValueError(f"output_upscaling: expected 2 × 2 stride-2 transposed convolutions, got {conv}")
        self.up1_w = nn.Parameter(first.weight.detach().permute(0, 2, 3, 1).reshape(first.in_channels, -1),
                                  requires_grad=False)
        self.up2_w = nn.Parameter(second.weight.detach().permute(0, 2, 3, 1).reshape(second.in_channels, -1),
                                  requires_grad=False)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        decoder = self.model.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)[None]
        tokens = torch.cat((output_tokens, sparse), dim=1)
        _, c, h, w = image_embeddings.shape
        hs, keys = decoder.transformer(image_embeddings + dense, self.model.prompt_encoder.get_dense_pe(), tokens)
        first, norm, act1, second, act2 = decoder.output_upscaling
        x = (keys.reshape(h * w, c) @ self.up1_w).reshape(h * w * 4, first.out_channels) + first.bias
        x = act1(torch.nn.functional.layer_norm(x, (first.out_channels,), norm.weight, norm.bias, norm.eps))
        x = act2((x @ self.up2_w).reshape(h * w * 16, second.out_channels) + second.bias)  # (y, x, dy1, dx1, dy2, dx2)
        hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)  # (1, T, C_up)
        masks = hyper_in[0] @ x.t()
        t = masks.shape[0]
        masks = masks.reshape(t, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(1, t, 4 * h, 4 * w)
        return masks, decoder.iou_prediction_head(hs[:, 0, :])


def _indices(state: dict[str, torch.Tensor], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    if not found:
        raise KeyError(pattern)
    return found


class SamEngine(TorchEngine):
    """Segment Anything behind the `Engine` protocol; safe to share across threads."""

    def __init__(self, model: Sam, *, device: torch.device, precision: str, weights_id: str) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self._identity = EngineId.of("sam", weights_id, precision)
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self._encode_lock = threading.Lock()  # one encode at a time bounds peak memory

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> SamEngine:
        """Load the configured checkpoint, verifying its SHA-256 where a digest is known."""
        return cls.from_checkpoint(
            settings.checkpoint_path, model_type=settings.model_type if settings.checkpoint is None else None,
            device=settings.device, precision=settings.precision, expected_sha256=expected_sha256(settings),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        *,
        model_type: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        expected_sha256: str | None = None,
    ) -> SamEngine:
        """Load weights with `torch.load(weights_only=True)`; the architecture comes from the tensors."""
        path = Path(path)
        file_id = checked_file_id(path, expected_sha256, label="SAM", model_type=model_type or "vit_b",
                                  unverified="loading it unverified")
        state = load_state_dict(path)
        if not isinstance(state, dict):
            raise EngineError(f"refused to load {path}: expected a state dict, got {type(state).__name__}")
        if is_mobile_sam(state):  # MobileSAM: TinyViT encoder, SAM's prompt encoder and decoder
            name = MOBILE_SAM
        else:
            arch = SamArchitecture.from_state_dict(state)
            name = arch.name
        if model_type is not None and name != model_type:
            raise EngineError(f"{path} holds a {name} model but SAM_MODEL_TYPE={model_type}")
        # Official architectures come from segment-anything's own registry (MobileSAM from its builder); others
        # from their shapes.
        model = cls.build(name) if name in sam_model_registry or name == MOBILE_SAM else arch.build()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EngineError(f"{path} does not fit a {name} SAM: {str(exc).splitlines()[0]}") from None
        dev = resolve_device(device)
        weights_id = f"{name}/{file_id[:12]}"
        log.info("loaded SAM %s from %s on %s", name, path, dev)
        return cls(model, device=dev, precision=resolve_precision(precision, dev), weights_id=weights_id)

    @classmethod
    def build(cls, model_type: str) -> Sam:
        """An official architecture with random weights: segment-anything's registry, or MobileSAM (`vit_t`)."""
        if model_type == MOBILE_SAM:
            return build_mobile_sam()
        return sam_model_registry[model_type](checkpoint=None)

    # -- Engine protocol ----------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an `(H, W, 3) uint8 RGB` image.

        Features: `image_embed` `(1, prompt_dim, grid, grid) float32` on the device; meta
        `input_size` `[h, w]`, the image resized so its longest side is the encoder's input size.
        """
        check_image(image)
        resized = self.transform.apply_image(image)  # the model's image_format is RGB
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        fast = self.fast_encoder
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16" and fast is None)
        with self._encode_lock, torch.inference_mode(), autocast:
            x = self.model.preprocess(pixels)
            features = self.model.image_encoder(x) if fast is None else fast(x.float())
        return Embedding(self.engine_id, ImageSize.of(image), {"image_embed": features.float().contiguous()},
                         {"input_size": [int(resized.shape[0]), int(resized.shape[1])]})

    def predict_with(self, decoder: FastDecoder | None, embedding: Embedding, prompt: ObjectPrompt,
                     prev_logits: np.ndarray | None = None) -> MaskPrediction:
        """Masks for one object. A lone first click asks for 3 candidates (ambiguity); later
        clicks ask for one, seeded with the previous low-res logits `(256, 256)` (4 × the embedding grid).
        `decoder` None runs the eager prompt encoder and mask decoder; a fast one runs `SamDecoderGraph`."""
        if embedding.engine_id != self.engine_id:
            raise EngineError(f"embedding from {embedding.engine_id} given to {self.engine_id}")
        original = embedding.image_size.shape
        size = tuple(embedding.meta["input_size"])
        multimask = wants_candidates(prompt, prev_logits)
        if decoder is None:
            points, box, mask_input = self.prompt_tensors(embedding, prompt, prev_logits)
            with torch.inference_mode():
                sparse, dense = self.model.prompt_encoder(points=points, boxes=box, masks=mask_input)
                low_res, iou = self.model.mask_decoder(
                    image_embeddings=self._features(embedding), image_pe=self.model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
        else:
            low_res, iou = decoder(self._graph_inputs(embedding, *self.prompt_arrays(embedding, prompt, prev_logits)))
            chosen = graph_candidates(multimask)
            low_res, iou = low_res[:, chosen], iou[:, chosen]
        return answer(low_res[0].float().cpu().numpy(), iou[0].float().cpu().numpy(), size, original,
                      self.model.image_encoder.img_size, self.model.mask_threshold)

    def prompt_arrays(self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
                      ) -> tuple[np.ndarray | None, ...]:
        """`sam_inputs.prompt_arrays` for this model: `(points (N, 2), labels (N,), box (4,), mask input (1, 1, 256,
        256))` in the encoder's input frame, each None where the prompt has none."""
        return prompt_arrays(prompt, embedding.image_size.shape, tuple(embedding.meta["input_size"]),
                             self.model.image_encoder.img_size, self.model.prompt_encoder.image_embedding_size[0],
                             prev_logits)

    def prompt_tensors(self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """The eager prompt encoder's inputs: `(points ((1, N, 2) float, (1, N) int) or None, box (1, 4) float or
        None, mask input (1, 1, 256, 256) float or None)` (see `prompt_arrays`)."""
        points, labels, box, mask_input = self.prompt_arrays(embedding, prompt, prev_logits)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, device=self.device)

        return (None if points is None else (tensor(points)[None], tensor(labels)[None]),
                None if box is None else tensor(box)[None], None if mask_input is None else tensor(mask_input))

    # -- adapted decoders (`sam_backend.segment.adapt`) ------------------------------------------------------------
    adapter_version: str | None = None  # None: the decoder as released
    released: SamEngine | None = None  # an adapted engine's engine as released (None: this one is)
    fallback: bool = False  # an adapted click whose mask misses more clicks gets the released decoder's (`predict`)
    answers: collections.Counter[str] | None = None  # an adapted engine's clicks by the decoder that answered

    @property
    def base_mask_decoder(self) -> torch.nn.Module:
        """The mask decoder as released (an adapted engine keeps its base's)."""
        return (self.released or self).model.mask_decoder

    def predict(self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
                ) -> MaskPrediction:
        """As `TorchEngine.predict`; an adapted engine with `fallback` answers with the released decoder's mask where
        the adapted mask disagrees with more of the prompt's clicks than that one (a learnt decoder that stops
        following corrective clicks near the boundary never leaves the annotator worse off than the released one)."""
        prediction = super().predict(embedding, prompt, prev_logits)
        if not self.fallback:
            return prediction
        missed = prompt.clicks_missed(prediction.best_mask)
        if missed:
            fallback = self.released.predict(embedding, prompt, prev_logits)
            if prompt.clicks_missed(fallback.best_mask) < missed:
                self.answers["released"] += 1
                return fallback
        self.answers["adapted"] += 1
        return prediction

    def with_mask_decoder(self, decoder: torch.nn.Module, version: str | None, fallback: bool = True) -> SamEngine:
        """The same engine (same `engine_id`: embeddings are shared) with another mask decoder, run eagerly;
        `version` names it (`adapter_version`). With `fallback`, a click whose mask misses more of its clicks than
        the released decoder's gets the released decoder's (see `predict`)."""
        other = self.clone()
        other.released = self.released or self
        other.fallback = fallback
        other.answers = collections.Counter(adapted=0, released=0)
        model = copy.copy(self.model)
        model._modules = dict(self.model._modules)
        model._modules["mask_decoder"] = decoder.to(self.device).eval()
        other.model = model
        other.fast_decoder = None
        other.adapter_version = version
        return other

    def _graph_inputs(self, embedding: Embedding, points: np.ndarray | None, labels: np.ndarray | None,
                      box: np.ndarray | None, mask_input: np.ndarray | None) -> dict[str, torch.Tensor]:
        """`SamDecoderGraph`'s inputs as tensors on the device: the embedding's features, `sam_inputs.prompt_feed`."""
        grid = self.model.prompt_encoder.image_embedding_size[0]
        feed = prompt_feed(points, labels, box, mask_input, grid)
        return {"image_embeddings": self._features(embedding),
                **{k: torch.as_tensor(v, device=self.device) for k, v in feed.items()}}

    def decoder_graph(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Embedding]:
        """`SamDecoderGraph` of these weights, example inputs, and an embedding of random features."""
        grid = self.model.prompt_encoder.image_embedding_size
        dim = self.model.prompt_encoder.embed_dim
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(1, dim, *grid, generator=generator).to(self.device)
        side = self.model.image_encoder.img_size
        size = ImageSize(side, side * 3 // 4)
        embedding = Embedding(self.engine_id, size, {"image_embed": features}, {"input_size": [size.height, side]})
        example = self._graph_inputs(embedding, np.array([[side / 3, side / 4]], np.float32), np.ones(1, np.int32),
                                     None, None)
        return SamDecoderGraph(self.model).eval(), example, embedding

    def _features(self, embedding: Embedding) -> torch.Tensor:
        features = embedding.features["image_embed"]
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(features)
        return features.to(self.device)
