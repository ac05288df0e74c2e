"""Which engine the settings name, built (`make_engine`), and what a download of a model must pass
(`download_check`). The one module that imports every engine: the protocol module (`engines/__init__.py`) imports
none of them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sam_backend.config import Settings
    from sam_backend.segment.engines import Engine
    from sam_backend.segment.engines.sam import SamEngine
    from sam_backend.segment.engines.sam2 import Sam2Engine

log = logging.getLogger(__name__)


def download_check(model_type: str) -> Callable[[Path], None] | None:
    """What a download of `model_type` must pass besides its size: a strict load into the architecture for
    SAM 2.1 (Meta publishes no digest); None for SAM, whose files are checked against published digests."""
    from sam_backend.config import SAM2_FILES

    if model_type not in SAM2_FILES:
        return None

    def check(path: Path) -> None:
        from sam_backend.segment.engines.sam2 import load_checked

        load_checked(path, model_type)

    return check


def make_engine(settings: Settings, settle_encoder: bool = False) -> Engine:
    """Build the engine the settings name (loads weights: call it off the request path). With `settle_encoder`, a
    first start's encoder measurement (`SAM_ENCODER=auto`) is waited for, so that the engine runs one encoder path
    from its first encode to its last (`evaluate`: the same command gives the same figures)."""
    if settings.engine == "grabcut":
        from sam_backend.segment.engines.grabcut import GrabCutEngine

        return GrabCutEngine()
    if settings.engine == "sam2":
        from sam_backend.segment.engines.sam2 import Sam2Engine

        engine: Sam2Engine | SamEngine = Sam2Engine.from_settings(settings)
    else:
        from sam_backend.segment.engines.sam import SamEngine

        engine = SamEngine.from_settings(settings)
    from sam_backend.segment.checkpoints import graph_base
    from sam_backend.segment.engines.encoder_choice import choose_encoder

    engine.use_decoder(settings.decoder, engine.decoder_cache(graph_base(settings.checkpoint_path)),
                       settings.check_images)
    if settings.engine == "sam":
        choose_encoder(engine, settings.encoder, settings.checkpoint_path, settings.check_images)
        if settle_encoder and engine.encoder_tuning is not None:
            log.warning("waiting for the image encoder's measurement (one-off for these weights on this machine), so "
                        "that the whole run uses one encoder path")
            engine.encoder_tuning.join()
    elif settings.encoder not in ("auto", "eager"):
        log.warning("SAM_ENCODER=%s applies to the sam engine only; SAM 2.1 encodes eagerly", settings.encoder)
    return engine
