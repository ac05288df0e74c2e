"""`sam-backend report` on a scripted project: what the page shows, and how long the report takes.

Starts the real Label Studio and the backend (GrabCut engine unless SAM_ENGINE/SAM_CHECKPOINT say otherwise) on
127.0.0.1, lets the scripted team of `tests/team_script.py` make `--objects` objects through Label Studio's
interactive endpoint (a fixed mix of boxes and clicks; accepted as answered, painted, rejected, drawn by hand, in
deleted and cancelled annotations), then runs `sam-backend report` as a user would (a new process) `--repeats` times
and prints one JSON object: the CPU, the report's wall seconds (median), and what the script did beside what the
report found.

    python benchmarks/bench_report.py --objects 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="Copy the report folder here.")
    args = parser.parse_args()

    from team_script import annotate_project, mixed_plans

    from sam_backend.commands.bench import cpu_info
    from sam_backend.labelstudio.process import LabelStudio

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ls = LabelStudio(tmp_path / "ls", "admin@example.com", "bench-Passw0rd").start()
        try:
            plans = mixed_plans(args.objects)
            started = time.perf_counter()
            project, ls_env = annotate_project(ls, tmp_path, plans)
            scripted_s = time.perf_counter() - started
            env = dict(os.environ, **ls_env)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "sam_backend", "report", "--project", str(project), "-o",
                                str(tmp_path / "report"), "--quiet"], env=env, check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            data = json.loads((tmp_path / "report" / "report.json").read_text())
            page_kb = (tmp_path / "report" / "report.html").stat().st_size / 1024
            if args.keep is not None:
                shutil.copytree(tmp_path / "report", args.keep, dirs_exist_ok=True)
        finally:
            ls.stop()
    outcomes = Counter(p.outcome for p in plans)
    made = [p for p in plans if p.outcome in ("as_answered", "painted")]
    print(json.dumps({
        "cpu": cpu_info(), "objects_scripted": len(plans), "tasks": max(p.task for p in plans) + 1,
        "outcomes": dict(outcomes),
        "requests_scripted": sum(len(p.prompts) for p in plans), "scripting_s": round(scripted_s, 1),
        "report_s_median": round(statistics.median(times), 2), "report_s": [round(t, 2) for t in times],
        "page_kb": round(page_kb, 1),
        "expected": {"objects": len(made), "hand_drawn": outcomes["hand"],
                     "clicks_median": statistics.median(len(p.prompts) for p in made),
                     "as_answered": round(outcomes["as_answered"] / len(made), 3)},
        "report": {"totals": data["totals"], "by_label": data["by_label"]},
    }, indent=1))


if __name__ == "__main__":
    main()
