"""docker-compose.yml and Dockerfile agree with the backend's settings (Docker cannot run here)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, require_or_skip

from sam_backend.config import Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


class Recording(dict):
    """A mapping that remembers every variable `Settings.from_env` asks for."""

    def __init__(self):
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)


def settings_variables() -> set[str]:
    env = Recording()
    Settings.from_env(env)
    return env.asked


def test_label_studio_service():
    ls = COMPOSE["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false" and ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["ports"] == ["127.0.0.1:8080:8080"] and "healthcheck" in ls
    assert any(v.endswith(":/label-studio/data") for v in ls["volumes"])


@pytest.mark.parametrize("name", ["sam-backend", "sam-backend-gpu"])
def test_backend_services_match_settings(name):
    svc = COMPOSE["services"][name]
    env = svc["environment"]
    known = settings_variables()
    assert set(env) <= known, f"unknown variables: {set(env) - known}"
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert env["LABEL_STUDIO_API_KEY"].startswith("${LABEL_STUDIO_API_KEY")
    Settings.from_env({k: v for k, v in env.items() if not str(v).startswith("$")})  # every literal value is valid
    assert svc["ports"] == ["127.0.0.1:9090:9090"] and "9090" in svc["healthcheck"]["test"][1]
    assert svc["depends_on"]["label-studio"]["condition"] == "service_healthy"
    volume = next(v for v in svc["volumes"] if v.startswith("sam-data:"))
    assert env["SAM_CHECKPOINT_DIR"].startswith(volume.split(":")[1])
    assert set(COMPOSE["volumes"]) >= {"sam-data", "label-studio-data"}


def test_gpu_profile_reserves_a_gpu():
    gpu = COMPOSE["services"]["sam-backend-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["SAM_DEVICE"] == "cuda"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert COMPOSE["services"]["sam-backend"]["profiles"] == ["cpu"]


def test_dockerfile_serves_on_the_compose_port_and_downloads_into_the_volume():
    text = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 9090" in text and "--port 9090" in text and "--host 0.0.0.0" in text
    assert "sam-backend ensure-model" in text and "SAM_CHECKPOINT_DIR=/data/checkpoints" in text
    assert "HEALTHCHECK" in text


def test_docker_compose_validates_the_file():
    if shutil.which("docker-compose") is None:
        require_or_skip("Debian's docker-compose is not installed (make test installs it with apt as root)")
    for profile in ("cpu", "gpu", "scale"):
        result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", profile,
                                 "config", "-q"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_scale_profile_puts_replicas_behind_nginx_with_redis_and_postgres():
    services = COMPOSE["services"]
    replica = services["sam-backend-replica"]
    env = replica["environment"]
    assert set(env) <= settings_variables()
    assert env["SAM_EMBEDDING_STORE"] == "redis://redis:6379/0"
    db = env["SAM_METADATA_DB"]
    assert db.startswith("postgresql://sam:") and db.endswith("@postgres:5432/sam")
    assert str(replica["deploy"]["replicas"]).startswith("${SAM_REPLICAS")
    assert "ports" not in replica  # reached through nginx only
    assert {"redis", "postgres", "sam-download"} <= set(replica["depends_on"])
    assert replica["depends_on"]["sam-download"]["condition"] == "service_completed_successfully"
    redis_cmd = services["redis"]["command"]
    assert "--maxmemory" in redis_cmd and redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    nginx = services["nginx"]
    assert nginx["ports"] == ["127.0.0.1:9090:9090"]
    assert "./deploy/nginx.conf.template:/etc/nginx/templates/nginx.conf.template:ro" in nginx["volumes"]
    assert "sam-backend-replica:9090" in nginx["environment"]["SAM_UPSTREAMS"]
    template = (ROOT / "deploy" / "nginx.conf.template").read_text()
    for variable in ("SAM_UPSTREAMS", "NGINX_LISTEN", "NGINX_PREFIX", "NGINX_USER"):
        assert "${" + variable + "}" in template and variable in nginx["environment"]
    assert "proxy_next_upstream error http_502 non_idempotent;" in template
    assert all(services[name]["profiles"] == ["scale"] for name in ("redis", "postgres", "nginx", "sam-download"))
