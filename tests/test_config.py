"""Settings.from_env: defaults, and a clear error for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from sam_backend.config import ConfigError, Settings


def test_defaults():
    s = Settings.from_env({})
    assert (s.engine, s.model_type, s.device, s.precision, s.cache_mb) == ("sam", "vit_b", "auto", "auto", 1024)
    assert s.checkpoint_path == Path("checkpoints/sam_vit_b_01ec64.pth")


def test_values_are_read():
    s = Settings.from_env({"SAM_ENGINE": "GrabCut", "SAM_MODEL_TYPE": "vit_h", "SAM_CACHE_MB": "64",
                           "SAM_REFINE": "off", "SAM_ALLOWED_HOSTS": "a.example, B.example",
                           "LABEL_STUDIO_URL": "http://127.0.0.1:8080/", "LABEL_STUDIO_API_KEY": "SECRET-KEY-123"})
    assert s.engine == "grabcut" and s.model_type == "vit_h" and s.cache_mb == 64 and not s.refine.enabled
    assert s.allowed_hosts == ("a.example", "b.example") and s.label_studio_url == "http://127.0.0.1:8080"
    assert "SECRET-KEY-123" not in repr(s)


@pytest.mark.parametrize(("env", "needle"), [
    ({"SAM_ENGINE": "yolo"}, "SAM_ENGINE: expected one of sam, sam2, grabcut, got 'yolo'"),
    ({"SAM_CACHE_MB": "lots"}, "SAM_CACHE_MB: expected an integer, got 'lots'"),
    ({"SAM_CACHE_MB": "-1"}, "SAM_CACHE_MB: expected an integer >= 0"),
    ({"SAM_REFINE": "maybe"}, "SAM_REFINE: expected true/false"),
    ({"SAM_CHECKPOINT_SHA256": "abc"}, "64 hex digits"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "http(s) URL"),
    ({"SAM_FETCH_TIMEOUT_S": "nan"}, "SAM_FETCH_TIMEOUT_S"),
    ({"SAM_DECODER": "tensorrt"}, "SAM_DECODER: expected one of auto, eager, onnx, compile, got 'tensorrt'"),
    ({"SAM_EMBEDDING_STORE": "memcached://127.0.0.1:11211"}, "SAM_EMBEDDING_STORE: expected redis://"),
    ({"SAM_EMBEDDING_STORE": "file://relative/dir"}, "file:///absolute/path"),
    ({"SAM_PREFETCH_NEXT": "-2"}, "SAM_PREFETCH_NEXT: expected an integer >= 0"),
    ({"SAM_METADATA_DB": "mysql://root@127.0.0.1/db"}, "SAM_METADATA_DB: expected a SQLite file path or postgresql://"),
])
def test_bad_values_fail_fast(env, needle):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)


def test_urls_with_passwords_stay_out_of_the_settings_repr():
    s = Settings.from_env({"SAM_METADATA_DB": "postgresql://sam:pg-secret-pw@127.0.0.1:5432/sam",
                           "SAM_EMBEDDING_STORE": "redis://:redis-secret-pw@127.0.0.1:6379/0"})
    assert s.metadata_db == "postgresql://sam:pg-secret-pw@127.0.0.1:5432/sam"  # a URL stays text, not a Path
    assert "secret" not in repr(s)
