"""Settings read once from the environment.

`Settings.from_env()` validates every value and raises `ConfigError` naming the variable, what
was expected and what arrived, so a bad deployment fails at start rather than on the first click.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("sam", "sam2", "grabcut")
# Official checkpoint file names by model type (URLs and digests: sam_backend.segment.checkpoints).
# `vit_t` is MobileSAM: a TinyViT-5M image encoder with SAM's own prompt encoder and mask decoder.
MOBILE_SAM = "vit_t"
SAM_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth",
             MOBILE_SAM: "mobile_sam.pt"}
SAM2_FILES = {f"sam2.1_hiera_{size}": f"sam2.1_hiera_{size}.pt" for size in ("tiny", "small", "base_plus", "large")}
CHECKPOINT_FILES = {**SAM_FILES, **SAM2_FILES}
MODEL_TYPES = tuple(CHECKPOINT_FILES)
ENGINE_MODELS = {"sam": tuple(SAM_FILES), "sam2": tuple(SAM2_FILES), "grabcut": MODEL_TYPES}
DEFAULT_MODEL = {"sam": "vit_b", "sam2": "sam2.1_hiera_tiny", "grabcut": "vit_b"}
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
DECODERS = ("auto", "eager", "onnx", "compile")
ENCODERS = ("auto", "eager", "onnx", "aoti")


class ConfigError(ValueError):
    """A setting has a value the backend cannot use."""


@dataclass(frozen=True)
class RefineSettings:
    """Mask clean-up parameters; areas in pixels of the original image.

    Defaults measured with MobileSAM's real weights on GrabCut and Berkeley (`benchmarks/tune_clicks.py`, NoC@90
    against the model's own mask): keeping only clicked parts cost 0.04-0.06 clicks, dropping specks below 256 px
    0.05 on Berkeley, filling holes below 256 px 0.03 on Berkeley's box protocol; clamping to the box (plus the
    margin) is what stays on. Each can be switched on for data where it helps."""

    enabled: bool = True
    box_margin_px: int = 8
    max_hole_px: int = 0
    min_island_px: int = 0
    keep_clicked: bool = False


def _metadata_db(value: str | None) -> Path | str:
    """`SAM_METADATA_DB`: a `postgresql://` URL stays text (a Path would fold its `//`), anything else a file."""
    if value and "://" in value:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"SAM_METADATA_DB: expected a SQLite file path or postgresql://user@host:5432/db, got "
                              f"a {value.split('://')[0]}:// URL")
        return value
    return Path(value or "annotations.db")


def _folder(name: str, value: str | None) -> Path | None:
    """An existing folder, or None where unset."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{name}: expected a folder of photos, got {value!r} (not a folder)")
    return path


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from its environment (see README for the table)."""

    engine: str = "sam"
    model_type: str = "vit_b"
    checkpoint_dir: Path = Path("checkpoints")
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None
    device: str = "auto"
    precision: str = "auto"
    decoder: str = "auto"  # the click's decoder path: auto | onnx | compile | eager (segment.engines.fast_decoder)
    encoder: str = "auto"  # the image encoder's path: auto | onnx | aoti | eager (segment.engines.encoder_choice)
    check_images: Path | None = None  # SAM_CHECK_IMAGES: photos the fast paths are checked on at first start
    quick_start: bool = True  # SAM_QUICK_START: serve from the cached ONNX graphs while torch loads (`onnx_sam`)
    cache_mb: int = 1024
    # SAM_EMBEDDING_STORE: redis://… or file:///… (serving.stores); not in repr: a URL may carry a password
    embedding_store: str | None = field(default=None, repr=False)
    embedding_store_mb: int = 8192  # the byte cap of a file:// store (Redis caps itself with maxmemory)
    refine: RefineSettings = field(default_factory=RefineSettings)
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    # a SQLite file, or a postgresql:// URL (kept as text; not in repr: it may carry a password)
    metadata_db: Path | str = field(default=Path("annotations.db"), repr=False)
    local_files_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    fetch_timeout_s: float = 20.0
    precompute_queue: int = 16
    prefetch_next: int = 0  # SAM_PREFETCH_NEXT: on a task opened, also queue the next K unlabeled tasks' images
    object_memory: bool = True  # join a box's refining clicks to it (see sam_backend.serving.memory)
    object_memory_ttl_s: float = 600.0
    click_deadline_s: float = 80.0  # answer a click still waiting for its encode before Label Studio's 100 s
    # SAM_ADAPT: learn each project's mask decoder from its accepted masks (serving.adapters, segment.adapt)
    adapt: bool = False
    adapter_dir: Path = Path("adapters")  # SAM_ADAPTER_DIR: the SQLite trainers' lock files (one host)
    adapt_min_masks: int = 5  # SAM_ADAPT_MIN_MASKS: accepted masks before the first training (≥ 5: one held out)
    adapt_every: int = 5  # SAM_ADAPT_EVERY: new accepted masks before training again
    adapt_steps: int = 150  # SAM_ADAPT_STEPS: optimizer steps of one training (one prompt each)
    adapt_max_masks: int = 200  # SAM_ADAPT_MAX_MASKS: a training's set at most (the newest plus a sample of the older)
    adapt_keep_versions: int = 3  # SAM_ADAPT_KEEP_VERSIONS: a project's newest versions kept (the served one is newest)
    adapt_cache_mb: int = 128  # SAM_ADAPT_CACHE_MB: learning's own embeddings (never the annotators' cache)
    webhook_secret: str | None = field(default=None, repr=False)  # SAM_WEBHOOK_SECRET: sent as X-SAM-Webhook-Secret

    def learning_problem(self) -> str | None:
        """Why `SAM_ADAPT=true` cannot run safely with these settings (what to set), or None."""
        if not self.adapt:
            return None
        missing = [n for n, v in (("LABEL_STUDIO_URL", self.label_studio_url),
                                  ("LABEL_STUDIO_API_KEY", self.label_studio_api_key)) if not v]
        if missing:
            return (f"SAM_ADAPT=true learns only from annotations it reads back from Label Studio with its own key; "
                    f"set {' and '.join(missing)} (or SAM_ADAPT=false)")
        return None

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint to load: `SAM_CHECKPOINT`, else the official file name in the checkpoint dir."""
        if self.checkpoint is not None:
            return self.checkpoint
        return self.checkpoint_dir / CHECKPOINT_FILES[self.model_type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings; `env` defaults to `os.environ`."""
        env = os.environ if env is None else env
        r = _Reader(env)
        refine = RefineSettings(
            enabled=r.boolean("SAM_REFINE", True),
            box_margin_px=r.integer("SAM_BOX_MARGIN_PX", 8, minimum=0),
            max_hole_px=r.integer("SAM_FILL_HOLES_PX", 0, minimum=0),
            min_island_px=r.integer("SAM_MIN_ISLAND_PX", 0, minimum=0),
            keep_clicked=r.boolean("SAM_KEEP_CLICKED", False),
        )
        engine = r.choice("SAM_ENGINE", "sam", ENGINES)
        model_type = r.choice("SAM_MODEL_TYPE", DEFAULT_MODEL[engine], MODEL_TYPES)
        if model_type not in ENGINE_MODELS[engine]:
            raise ConfigError(f"SAM_MODEL_TYPE: {model_type!r} is not a model of SAM_ENGINE={engine}; expected one of "
                              f"{', '.join(ENGINE_MODELS[engine])}")
        checkpoint = r.text("SAM_CHECKPOINT")
        digest = r.text("SAM_CHECKPOINT_SHA256")
        if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower())):
            raise ConfigError(f"SAM_CHECKPOINT_SHA256: expected 64 hex digits, got {digest!r}")
        url = r.text("LABEL_STUDIO_URL")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"LABEL_STUDIO_URL: expected an http(s) URL, got {url!r}")
        if r.text("LABEL_STUDIO_API_KEY") and url is None:
            # Without a configured address the key would go wherever a `/setup` call points.
            raise ConfigError("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever sent to "
                              "the Label Studio address you configure; set LABEL_STUDIO_URL (e.g. "
                              "http://127.0.0.1:8080) or unset LABEL_STUDIO_API_KEY")
        store = r.text("SAM_EMBEDDING_STORE")
        if store is not None and not (store.startswith(("redis://", "rediss://", "unix://", "file:///"))):
            raise ConfigError(f"SAM_EMBEDDING_STORE: expected redis://host:6379/0 or file:///absolute/path, got "
                              f"{store!r}")
        root = r.text("LOCAL_FILES_DOCUMENT_ROOT")
        hosts = tuple(h.strip().lower() for h in (r.text("SAM_ALLOWED_HOSTS") or "").split(",") if h.strip())
        return cls(
            engine=engine,
            model_type=model_type,
            checkpoint_dir=Path(r.text("SAM_CHECKPOINT_DIR") or "checkpoints"),
            checkpoint=Path(checkpoint) if checkpoint else None,
            checkpoint_sha256=digest.lower() if digest else None,
            device=r.choice("SAM_DEVICE", "auto", DEVICES),
            precision=r.choice("SAM_PRECISION", "auto", PRECISIONS),
            decoder=r.choice("SAM_DECODER", "auto", DECODERS),
            encoder=r.choice("SAM_ENCODER", "auto", ENCODERS),
            check_images=_folder("SAM_CHECK_IMAGES", r.text("SAM_CHECK_IMAGES")),
            cache_mb=r.integer("SAM_CACHE_MB", 1024, minimum=0),
            embedding_store=store,
            embedding_store_mb=r.integer("SAM_EMBEDDING_STORE_MB", 8192, minimum=1),
            refine=refine,
            label_studio_url=url.rstrip("/") if url else None,
            label_studio_api_key=r.text("LABEL_STUDIO_API_KEY"),
            basic_auth_user=r.text("BASIC_AUTH_USER"),
            basic_auth_pass=r.text("BASIC_AUTH_PASS"),
            metadata_db=_metadata_db(r.text("SAM_METADATA_DB")),
            local_files_root=Path(root).resolve() if root else None,
            allowed_hosts=hosts,
            max_image_bytes=r.integer("SAM_MAX_IMAGE_MB", 50, minimum=1) * 1024 * 1024,
            max_image_pixels=r.integer("SAM_MAX_IMAGE_PIXELS", 50_000_000, minimum=1),
            fetch_timeout_s=r.number("SAM_FETCH_TIMEOUT_S", 20.0, minimum=0.1),
            precompute_queue=r.integer("SAM_PRECOMPUTE_QUEUE", 16, minimum=0),
            prefetch_next=r.integer("SAM_PREFETCH_NEXT", 0, minimum=0),
            click_deadline_s=r.number("SAM_CLICK_DEADLINE_S", 80.0, minimum=0.1),
            object_memory=r.boolean("SAM_OBJECT_MEMORY", True),
            object_memory_ttl_s=r.number("SAM_OBJECT_MEMORY_TTL_S", 600.0, minimum=1.0),
            adapt=r.boolean("SAM_ADAPT", False),
            quick_start=r.boolean("SAM_QUICK_START", True),
            adapter_dir=Path(r.text("SAM_ADAPTER_DIR") or "adapters"),
            adapt_min_masks=r.integer("SAM_ADAPT_MIN_MASKS", 5, minimum=5),
            adapt_every=r.integer("SAM_ADAPT_EVERY", 5, minimum=1),
            adapt_steps=r.integer("SAM_ADAPT_STEPS", 150, minimum=1),
            adapt_max_masks=r.integer("SAM_ADAPT_MAX_MASKS", 200, minimum=5),
            adapt_keep_versions=r.integer("SAM_ADAPT_KEEP_VERSIONS", 3, minimum=1),
            adapt_cache_mb=r.integer("SAM_ADAPT_CACHE_MB", 128, minimum=1),
            webhook_secret=r.text("SAM_WEBHOOK_SECRET"),
        )


class _Reader:
    """Typed access to an environment mapping with errors that name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = (self.text(name) or default).lower()
        if value not in options:
            raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float | None = None) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if value != value or (minimum is not None and value < minimum):
            raise ConfigError(f"{name}: expected a number >= {minimum}, got {raw!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false (1/0, yes/no, on/off), got {raw!r}")
