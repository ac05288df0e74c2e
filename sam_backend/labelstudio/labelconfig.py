"""Label configs: which Image / BrushLabels / PolygonLabels pairs a project's config offers, its label
names, and which field of a task holds the image URL.

The SDK's `LabelInterface` parses the XML; `label_interface` is the one wrapper around it, turning
its many exception classes into one error that names the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from sam_backend.errors import ClientError

OUTPUT_TAGS = ("brushlabels", "polygonlabels")  # where masks go, in order of preference
LABEL_TAGS = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels", "labels")
IMAGE_KEYS = ("image", "img", "url")  # task.data keys tried when the config does not name one


class LabelConfigError(ClientError):
    """The labeling config cannot be used (400)."""


def label_interface(config: str) -> LabelInterface:
    """Parse a labeling config; `LabelConfigError` with the SDK's reason on any failure."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("label_config: expected the project's labeling config XML, got nothing")
    try:
        return LabelInterface(config)
    except Exception as exc:  # the SDK raises several XML/validation classes
        raise LabelConfigError(f"label_config: not a valid labeling config ({str(exc)[:200]})") from None


@dataclass(frozen=True)
class TargetControls:
    """What the label config offers for one image: where masks go and which labels exist."""

    image: str  # Image object name
    value_key: str  # task.data key holding the image URL
    output: str  # BrushLabels or PolygonLabels control name
    output_type: str  # "brushlabels" or "polygonlabels"
    labels: tuple[str, ...]

    def label_for(self, wanted: str | None) -> str | None:
        """`wanted` if the control offers it, else the control's first label (or `wanted` without labels)."""
        if wanted in self.labels:
            return wanted
        return self.labels[0] if self.labels else wanted


@dataclass(frozen=True)
class LabelConfig:
    targets: tuple[TargetControls, ...]

    def for_image(self, image: str | None) -> TargetControls:
        for t in self.targets:
            if image is None or t.image == image:
                return t
        return self.targets[0]


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> LabelConfig:
    """Find each Image with a BrushLabels (preferred) or PolygonLabels control on it."""
    li = label_interface(config)
    targets = []
    for obj in li.objects:
        if obj.tag.lower() != "image":
            continue
        key = str(obj.value).lstrip("$")
        outputs = [c for c in li.controls if obj.name in (c.to_name or [])]
        for kind in OUTPUT_TAGS:
            found = [c for c in outputs if c.tag.lower() == kind]
            if found:
                c = found[0]
                targets.append(TargetControls(obj.name, key, c.name, kind, tuple(c.labels or ())))
                break
    if not targets:
        raise LabelConfigError("label_config: expected an <Image> with a <BrushLabels> or <PolygonLabels> control "
                               "for the masks; see label_config/points-and-boxes-brush.xml")
    return LabelConfig(tuple(targets))


def category_names(config: str) -> list[str]:
    """Label names of the labeling controls, in config order, each once."""
    names: list[str] = []
    for control in label_interface(config).controls:
        if control.tag.lower() in LABEL_TAGS:
            for label in control.labels or ():
                if label not in names:
                    names.append(label)
    return names


def task_image_url(task: Mapping[str, Any], key: str | None = None) -> str | None:
    """The image URL of a task: `data[key]` when the config names the key, else the first of
    `image`, `img`, `url`, else the first string in `data`; None where there is none."""
    data = task.get("data")
    if not isinstance(data, Mapping):
        return None
    if key is not None:
        value = data.get(key)
        return value if isinstance(value, str) else None
    for k in IMAGE_KEYS:
        if isinstance(data.get(k), str):
            return data[k]
    return next((v for v in data.values() if isinstance(v, str)), None)


def required_image_url(task: Mapping[str, Any], target: TargetControls) -> str:
    """The image URL the config's `<Image value="$key">` names in this task; `LabelConfigError` (400) if absent."""
    url = task_image_url(task, target.value_key)
    if url is None:
        data = task.get("data")
        raise LabelConfigError(f"task {task.get('id')}: expected data.{target.value_key} (the image URL named by "
                               f"<Image value=\"${target.value_key}\">), got keys "
                               f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
    return url
