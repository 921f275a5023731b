"""Run stage 2 for several methods from one stage-1 snapshot and print the comparison + where step time goes.

    python benchmarks/compare_methods.py                       # configs/compare_cpu.yaml, all its methods
    python benchmarks/compare_methods.py --methods scpo grpo --run-dir runs/cmp rl.steps=10

A thin driver over `scpo train` (the comparison mode of the trainer: every method starts from the same
``rl_start`` snapshot) followed by `scpo report`; it adds a phase-time table per method (seconds per RL
step and the share of each phase), printed as ratios against the fastest method measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/compare_cpu.yaml")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--methods", nargs="*", default=None, help="override compare.methods")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    a = p.parse_intermixed_args(argv)

    from megatron_scpo.config import load_config
    from megatron_scpo.trainer.report import phase_table, write_report
    from megatron_scpo.trainer.run import quiet_warnings, train

    quiet_warnings()
    overrides = list(a.overrides)
    if a.methods:
        overrides.append(f"compare.methods=[{','.join(a.methods)}]")
    cfg = load_config(a.config, overrides)
    run_dir = Path(a.run_dir or cfg.run_dir or Path("runs") / cfg.name)
    train(cfg, run_dir)
    print(write_report([run_dir], run_dir))
    print("\n## Where RL step time goes\n")
    print(phase_table(run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
