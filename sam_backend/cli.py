"""Command line: `sam-backend download | bench | serve | doctor | history | export | up`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from sam_backend.config import MODEL_TYPES, ConfigError, Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for INFO, -vv for DEBUG logging.")
def main(verbose: int) -> None:
    """Segment Anything backend and mask exporter for Label Studio."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


@main.command()
@click.argument("model_type", type=click.Choice(MODEL_TYPES), default="vit_b")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Folder for the checkpoint (default: SAM_CHECKPOINT_DIR or ./checkpoints).")
@click.option("--url", default=None, help="Download from this mirror instead of the official URL.")
@click.option("--sha256", "digest", default=None, help="Expected SHA-256 (required with a mirror of another file).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(model_type: str, dest: Path | None, url: str | None, digest: str | None, quiet: bool) -> None:
    """Fetch an official SAM checkpoint, resumable, verified against its SHA-256."""
    from dataclasses import replace

    from sam_backend.download import CHECKPOINTS, DownloadError, download_checkpoint

    spec = CHECKPOINTS[model_type]
    if url:
        spec = replace(spec, url=url)
    if digest:
        spec = replace(spec, sha256=digest.lower(), size=None)
    dest = dest or _settings().checkpoint_dir
    try:
        path = download_checkpoint(spec, dest, progress=not quiet)
    except DownloadError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path} verified (sha256 {spec.sha256})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--model-type", type=click.Choice(MODEL_TYPES), default=None, help="Default: SAM_MODEL_TYPE.")
@click.option("--random-weights", is_flag=True, help="Seeded random weights (timing does not depend on them).")
@click.option("--repeats", default=3, show_default=True, help="Encoder runs per figure.")
@click.option("--width", default=1024, show_default=True)
@click.option("--height", default=768, show_default=True)
def bench(as_json: bool, model_type: str | None, random_weights: bool, repeats: int, width: int, height: int) -> None:
    """Median timings of encoder, decoder and clicks; see sam_backend/bench.py."""
    from sam_backend.bench import run_bench
    from sam_backend.engines import EngineError
    from sam_backend.engines.sam import SamEngine

    settings = _settings()
    model_type = model_type or settings.model_type
    try:
        if random_weights:
            engine = SamEngine.random(model_type, device=settings.device, precision=settings.precision)
        else:
            engine = SamEngine.from_settings(settings)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    result = run_bench(engine, width=width, height=height, repeats=repeats, refine_settings=settings.refine)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key:>22}  {value}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", default=9090, show_default=True)
@click.option("--workers", default=1, show_default=True, help="Processes; each holds its own model and cache.")
@click.option("--threads", default=8, show_default=True, help="Threads per process (health answers while encoding).")
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Serve the ML backend with gunicorn (threads)."""
    from gunicorn.app.base import BaseApplication

    from sam_backend.server import create_app, install_redaction

    settings = _settings()
    logging.getLogger().setLevel(logging.INFO)
    install_redaction(settings)

    class _App(BaseApplication):
        def load_config(self) -> None:
            for key, value in {"bind": f"{host}:{port}", "workers": workers, "threads": threads,
                               "worker_class": "gthread", "timeout": 300, "graceful_timeout": 10,
                               "accesslog": None, "loglevel": "info"}.items():
                self.cfg.set(key, value)

        def load(self):  # noqa: ANN202 - gunicorn's signature
            install_redaction(settings)
            return create_app(settings)

    click.echo(f"sam-backend {settings.engine} listening on http://{host}:{port}", err=True)
    _App().run()
