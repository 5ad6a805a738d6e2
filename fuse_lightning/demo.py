"""`make demo`: the whole pipeline at toy scale, through the same code as `fuse sweep`.

Trains the FUSE generator and the EM baseline on a small CIFAR-10 subset, writes both protected
sets, trains fastnet victims on the clean / EM / FUSE sets with and without an ideal low-pass
filter, and prints the accuracy table (`configs/sweeps/demo.yaml`; about 10 minutes on 2 CPU
cores). Rerunning skips what is done, so an interrupted demo resumes.

    python -m fuse_lightning.demo --data_dir ../shared/data [--work_dir outputs/demo] [--dry_run]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser

from fuse_lightning.sweep import sweep_main

REPO = Path(__file__).resolve().parents[1]
DEMO_SWEEP = "configs/sweeps/demo.yaml"


def build_parser() -> ArgumentParser:
    """Arguments of the demo."""
    parser = ArgumentParser(prog="python -m fuse_lightning.demo",
                            description="CPU-sized end-to-end run: FUSE and EM protection, victims, accuracy table.")
    parser.add_argument("--data_dir", type=str, default=os.environ.get("FUSE_DATA_DIR", "data"),
                        help="Folder containing cifar-10-batches-py/ (downloaded there when missing and online); "
                        "default $FUSE_DATA_DIR, else 'data'.")
    parser.add_argument("--work_dir", type=str, default="outputs/demo",
                        help="Protected sets, runs and results/ go here.")
    parser.add_argument("--sweep", type=str, default=DEMO_SWEEP, help="Sweep file.")
    parser.add_argument("--dry_run", action=ActionYesNo, nargs="?", default=False,
                        help="Print the commands; run nothing.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 when every stage succeeded)."""
    args = build_parser().parse_args(argv)
    data_dir, work_dir = Path(args.data_dir), Path(args.work_dir)
    if not Path(args.sweep).is_file() and (REPO / args.sweep).is_file():
        # Config paths in sweep files are relative to the repository root: run from there.
        data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
        os.chdir(REPO)
    if not (data_dir / "cifar-10-batches-py").is_dir() and data_dir.name != "cifar-10-batches-py":
        print(f"note: {data_dir}/cifar-10-batches-py not found; the DataModule will try to download "
              "CIFAR-10 there (needs internet). Point --data_dir at the folder that contains it.")
    print(f"demo: work dir {work_dir}; data {data_dir}")
    start = time.perf_counter()
    code = sweep_main([args.sweep, "--data_dir", str(data_dir), "--work_dir", str(work_dir),
                       "--results_dir", str(work_dir / "results")] + (["--dry_run"] if args.dry_run else []))
    if not args.dry_run and code != 2:
        status = "finished" if code == 0 else "finished with failures (see the logs named above)"
        print(f"demo {status} in {(time.perf_counter() - start) / 60:.1f} min; "
              f"table, CSV and plots in {work_dir / 'results'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
