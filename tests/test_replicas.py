"""Three replicas (`sam-backend serve`, tiny SAM) behind a real nginx, sharing a real Redis and a real PostgreSQL,
all on 127.0.0.1: one encode per image across replicas, and a replica killed with SIGKILL in the middle."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import pytest
import requests
from conftest import load_request
from services import Nginx, Postgres, Redis
from synthetic import disc_scene

from sam_backend.labelstudio.client import free_port
from sam_backend.labelstudio.process import stop_process

pytestmark = pytest.mark.integration
IMAGES = 12
W, H = 320, 240


class Replica:
    """`python -m sam_backend serve` on its own port, stopped by PID (or killed)."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        self.proc = subprocess.Popen([sys.executable, "-m", "sam_backend", "serve", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--threads", "8"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica on {self.port} exited with {self.proc.returncode}"
            try:
                if requests.get(self.url + "/health", timeout=2).json().get("engine_ready"):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"replica on {self.port} did not load its engine")

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, grace_s=10)


@pytest.fixture()
def stack(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(IMAGES):
        image, _, _ = disc_scene(H, W, seed=i)
        cv2.imwrite(str(images / f"img{i}.png"), image[:, :, ::-1])
    checkpoint = tmp_path / "tiny_sam.pth"
    shutil.copy(tiny_checkpoint, checkpoint)
    redis = Redis(tmp_path / "redis").start()
    postgres = Postgres(tmp_path / "pg").start()
    env = {**os.environ, "SAM_ENGINE": "sam", "SAM_CHECKPOINT": str(checkpoint), "SAM_DEVICE": "cpu",
           "SAM_PRECISION": "fp32", "SAM_EMBEDDING_STORE": redis.url, "SAM_METADATA_DB": postgres.url,
           "LOCAL_FILES_DOCUMENT_ROOT": str(images), "OMP_NUM_THREADS": "1"}
    replicas = [Replica(env).start() for _ in range(3)]
    nginx = None
    try:
        for r in replicas:
            r.wait_ready()
        nginx = Nginx(tmp_path / "nginx", [f"127.0.0.1:{r.port}" for r in replicas]).start()
        yield replicas, nginx, postgres, redis
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.stop()
        postgres.stop()
        redis.stop()


def opened(i: int) -> dict:
    body = load_request("predict.task-opened")
    body["tasks"] = [{"id": 1000 + i, "data": {"image": f"/data/local-files/?d=img{i}.png"}}]
    body["project"] = "1.0"
    return body


def click(i: int, points: list[tuple[float, float]]) -> dict:
    body = load_request("predict.context-keypointlabels")
    body["tasks"] = [{"id": 1000 + i, "data": {"image": f"/data/local-files/?d=img{i}.png"}}]
    body["project"] = "1.0"
    template = body["params"]["context"]["result"][0]
    body["params"]["context"]["result"] = [
        {**template, "id": f"k{n}", "original_width": W, "original_height": H,
         "value": {**template["value"], "x": x, "y": y}} for n, (x, y) in enumerate(points)]
    return body


def annotate(url: str, seed: int, answered: list, failures: list, stop: threading.Event, rounds: int) -> None:
    """One annotator: opens tasks in its own order and clicks 2-3 times on the object of each."""
    rng = random.Random(seed)
    http = requests.Session()
    for _ in range(rounds):
        for i in rng.sample(range(IMAGES), 6):
            if stop.is_set():
                return
            http.post(url + "/predict", json=opened(i), timeout=30)
            points: list[tuple[float, float]] = []
            for _ in range(rng.randint(2, 3)):
                points.append((45.0 + rng.uniform(-3, 3), 55.0 + rng.uniform(-3, 3)))
                resp = http.post(url + "/predict", json=click(i, points), timeout=60)
                if resp.status_code == 200 and resp.json()["results"][0]["result"]:
                    answered.append(i)
                elif resp.status_code != 422:  # 422: the tiny model found no object (said, not a failure)
                    failures.append((resp.status_code, resp.text[:200]))


def run_annotators(url: str, n: int, rounds: int, during=None) -> tuple[list, list]:
    answered: list = []
    failures: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=annotate, args=(url, s, answered, failures, stop, rounds)) for s in range(n)]
    for t in threads:
        t.start()
    if during is not None:
        during(answered)
    for t in threads:
        t.join(300)
    return answered, failures


def rows(postgres: Postgres) -> int:
    import psycopg

    with psycopg.connect(postgres.url) as conn:
        return conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]


def test_three_replicas_encode_each_image_once(stack):
    replicas, nginx, postgres, _ = stack
    answered, failures = run_annotators(nginx.url, n=8, rounds=1)
    assert not failures and len(answered) >= 8 * 6
    assert sum(r.metric("sam_encoder_seconds_count") for r in replicas) == IMAGES
    # Clicks landed on replicas that did not encode their image and found it in Redis.
    assert sum(r.metric('sam_store_total{result="hit"}') + r.metric('sam_store_total{result="waited"}')
               for r in replicas) > 0
    assert all(r.metric("sam_encoder_seconds_count") < IMAGES for r in replicas)
    assert rows(postgres) == len(answered)


def test_a_replica_killed_in_the_middle(stack):
    replicas, nginx, postgres, _ = stack
    victim = replicas[1]

    def kill_after_some(answered: list) -> None:
        deadline = time.monotonic() + 120
        while len(answered) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.kill()

    answered, failures = run_annotators(nginx.url, n=8, rounds=1, during=kill_after_some)
    assert victim.proc.returncode == -signal.SIGKILL
    assert not failures, failures[:3]  # every click was answered (nginx retried the dead replica's)
    assert rows(postgres) == len(answered)  # one row per answered click: none lost, none twice
    # The restarted replica answers its first click on a known image from the shared tier.
    restarted = Replica(victim.env, port=victim.port).start()
    try:
        restarted.wait_ready()
        resp = requests.post(restarted.url + "/predict", json=click(answered[0], [(45.0, 55.0)]), timeout=60)
        assert resp.status_code == 200
        assert restarted.metric("sam_encoder_seconds_count") == 0
        assert restarted.metric('sam_store_total{result="hit"}') == 1
    finally:
        restarted.stop()


def test_redis_and_postgres_stopped_in_the_middle(stack):
    """Both shared services go away while 8 annotators click, and come back: every click is answered (each
    replica's own cache), and once PostgreSQL is back every answered click has its row (they waited)."""
    replicas, nginx, postgres, redis = stack

    def outage(answered: list) -> None:
        deadline = time.monotonic() + 120
        while len(answered) < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        redis.stop()
        postgres.stop()
        while len(answered) < 35 and time.monotonic() < deadline:
            time.sleep(0.05)
        redis.start()
        postgres.start()

    answered, failures = run_annotators(nginx.url, n=8, rounds=1, during=outage)
    assert not failures, failures[:3]
    assert sum(r.metric("sam_store_errors") for r in replicas) > 0  # the outage was seen
    deadline = time.monotonic() + 60
    while rows(postgres) < len(answered) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rows(postgres) == len(answered)
