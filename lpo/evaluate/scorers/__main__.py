"""`python -m lpo.evaluate.scorers score`: every image of a sample folder scored by the configured scorers, one CSV
row per image. Runs in the scorers' own environment (workflow/envs/scorers.yaml), so it imports only
lpo.evaluate.scorers and lpo.tables; images that do not decode are named in the log, left empty in the CSV and
marked `decoded` = 0."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from lpo.evaluate.scorers import CheckpointMismatch, build_scorer, missing_checkpoints
from lpo.evaluate.scorers.sample_folder import read_index
from lpo.tables import write_csv

log = logging.getLogger("lpo.evaluate.scorers")


def score_folder(folder: str, scorers: dict[str, dict], batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """One row per image of `folder`: its index fields, one value per scorer (NaN when it did not decode) and
    `decoded`. `scorers`: scorer name -> constructor arguments with local paths (lpo.evaluate.scorers.build_scorer)."""
    problems = missing_checkpoints(scorers)
    if problems:
        raise FileNotFoundError("scorer checkpoint(s) missing:\n" + "\n".join(f"  - {p}" for p in problems))
    rows = read_index(folder)
    files, prompts = [r["file"] for r in rows], [r["prompt"] for r in rows]
    decoded = np.ones(len(rows), dtype=bool)
    for name, kwargs in scorers.items():
        scorer = build_scorer(name, **{"device": device, **kwargs})
        scores = scorer.score(files, prompts, batch_size)
        decoded[list(scores.skipped)] = False
        for row, value in zip(rows, scores.values):
            row[name] = float(value)
        del scorer
    bad = [files[i] for i in np.flatnonzero(~decoded)]
    if bad:
        log.warning("%d of %d image(s) in '%s' failed to decode and are left out of the means: %s", len(bad),
                    len(rows), folder, ", ".join(bad))
    for row, ok in zip(rows, decoded):
        row["decoded"] = int(ok)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lpo.evaluate.scorers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score a sample folder (index.csv + PNGs) with the scorers")
    score.add_argument("--scorers", required=True,
                       help="JSON object: scorer name -> constructor arguments (local checkpoint paths)")
    score.add_argument("--samples", required=True, help="the sample folder")
    score.add_argument("--out", required=True, help="the scores CSV")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scorers = json.loads(args.scorers)
        if not isinstance(scorers, dict) or not scorers:
            raise ValueError("--scorers must be a non-empty JSON object of scorer name -> arguments")
        device = args.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = score_folder(args.samples, scorers, args.batch_size, device)
        write_csv(args.out, [{k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
                             for r in rows])
    except (ValueError, FileNotFoundError, CheckpointMismatch, json.JSONDecodeError) as e:
        print(f"lpo.evaluate.scorers: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
