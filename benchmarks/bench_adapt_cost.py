"""What one training costs per accepted mask, the learning settings of this release against the previous ones, side by
side in one process on the same photographs.

For each category of a dataset folder with categories (COCO-MVal's file names, a COCO file's `categories`), its first
`--masks` objects are the accepted masks (every fifth held out to judge, as the backend does); their embeddings are
computed first and not counted (the backend has them from the clicks). Then `segment.adapt.adapt` runs with each
setting, alternating, `--repeat` times: its seconds (simulated prompts, optimizer steps, held-out judgement) per
accepted mask and the resident memory it added (sampled while it ran). Prints one JSON object with the CPU, the
medians per setting and their ratio.

    SAM_ENGINE=sam SAM_MODEL_TYPE=vit_t .venv/bin/python benchmarks/bench_adapt_cost.py \\
        ../shared/evaldata/COCO_MVal_A --category kite --category bench --category car
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from sam_backend.commands.bench import cpu_info
from sam_backend.commands.evalsets import by_category, image_root, load_objects
from sam_backend.commands.rss import PeakRss
from sam_backend.config import Settings
from sam_backend.labelstudio.images import decode_image
from sam_backend.segment.adapt import EARLIER_PARTS, AdaptConfig, Example, adapt, split_held_out, training_steps
from sam_backend.segment.engines.factory import make_engine

log = logging.getLogger("bench_adapt_cost")

SETTINGS = {
    "previous": AdaptConfig(parts=EARLIER_PARTS, rounds=3),  # tokens and upscaling learnt, runs simulated twice more
    "now": AdaptConfig(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--category", action="append", required=True)
    parser.add_argument("--masks", type=int, default=5, help="accepted masks per category (K)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = Settings.from_env()
    engine = make_engine(settings, settle_encoder=True)
    groups = by_category(load_objects(args.data))
    root = image_root(args.data)
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    growth: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for category in args.category:
        objects = groups[category][: args.masks]
        examples = [Example(engine.embed(decode_image((root / o.image).read_bytes(), settings.max_image_pixels)),
                            o.mask, o.ignore, o.name) for o in objects]
        train, held = split_held_out(examples)
        for _ in range(args.repeat):
            for name, config in SETTINGS.items():
                with PeakRss() as peak:
                    outcome = adapt(engine, train, held, replace(config, steps=training_steps(len(train),
                                                                                              config.steps)))
                seconds[name].append(outcome.seconds / len(examples))
                growth[name].append(peak.growth_mb)
                log.info("%s %s: %.2f s per mask, +%.0f MB, kept %s", category, name, seconds[name][-1],
                         growth[name][-1], outcome.accepted)
    result = {**cpu_info(), "engine": engine.engine_id, "masks": args.masks, "categories": args.category,
              "seconds_per_mask": {n: round(statistics.median(v), 2) for n, v in seconds.items()},
              "rss_growth_mb": {n: round(max(v)) for n, v in growth.items()},
              "ratio_now_to_previous": round(statistics.median(seconds["now"]) /
                                             statistics.median(seconds["previous"]), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
