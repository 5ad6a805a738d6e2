"""`make demo`: the whole pipeline at toy scale, through the same code as `fuse sweep`.

Trains the FUSE generator and the EM baseline on a small CIFAR-10 subset, writes both protected
sets, trains fastnet victims on the clean / EM / FUSE sets with and without an ideal low-pass
filter, and prints the accuracy table (`configs/sweeps/demo.yaml`; about 10 minutes on 2 CPU
cores). Rerunning skips what is done, so an interrupted demo resumes.

    python -m fuse_lightning.demo --data-dir ../shared/data [--work-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fuse_lightning.sweep import SweepError, load_sweep, missing_files, run_local

REPO = Path(__file__).resolve().parents[1]
DEMO_SWEEP = "configs/sweeps/demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m fuse_lightning.demo",
        description="CPU-sized end-to-end run: FUSE and EM protection, victims, accuracy table.",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FUSE_DATA_DIR", "data"),
        help="folder containing cifar-10-batches-py/ (downloaded there when missing and online); "
        "default $FUSE_DATA_DIR or 'data'",
    )
    parser.add_argument("--work-dir", default="outputs/demo",
                        help="protected sets, runs and results/ go here (default outputs/demo)")
    parser.add_argument("--sweep", default=DEMO_SWEEP, help=f"sweep file (default {DEMO_SWEEP})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 when every stage succeeded)."""
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir).resolve()
    work_dir = Path(args.work_dir).resolve()
    # Config paths in sweep files are relative to the repository root; allow running elsewhere.
    if not Path(args.sweep).is_file() and (REPO / args.sweep).is_file():
        os.chdir(REPO)
    try:
        sweep = load_sweep(args.sweep, work_dir=work_dir, results_dir=work_dir / "results")
        if missing := missing_files(sweep):
            raise SweepError(f"{sweep.path}: victim_configs: file(s) not found: {missing}")
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (data_dir / "cifar-10-batches-py").is_dir() and data_dir.name != "cifar-10-batches-py":
        print(f"note: {data_dir}/cifar-10-batches-py not found; the DataModule will try to download "
              "CIFAR-10 there (needs internet). Point --data-dir at the folder that contains it.")
    print(f"demo: work dir {work_dir}; data {data_dir}")
    start = time.perf_counter()
    code = run_local(sweep, str(data_dir), dry_run=args.dry_run)
    if not args.dry_run:
        minutes = (time.perf_counter() - start) / 60
        status = "finished" if code == 0 else "finished with failures (see the logs named above)"
        print(f"demo {status} in {minutes:.1f} min; table, CSV and plots in {sweep.results_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
