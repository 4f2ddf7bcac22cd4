"""The Mosaic GPU forward spike (kernels/pallas/mosaic_fwd.py) on one standard layer: correctness
against `reference` (float32 'highest'), then kernel-level forward times against `triton` and
`dense` on the same operands (bench/_timing.py's loop, queued calls). Each stage is guarded, so a
failure is recorded and the rest still runs; rows go to OUT/mosaic_spike.json after every stage
(bench/_spike.py).

    python -m bench.mosaic_spike OUT_DIR [--config d3_n64_b4_c16] [--zy N --b B]
"""

from __future__ import annotations

import argparse

from bench import _configs
from bench._spike import Spike


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mosaic_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--zy", type=int, default=None, help="z and y extent override (a CPU dry run: 2)")
    p.add_argument("--b", type=int, default=None, help="batch override")
    args = p.parse_args(argv)
    from kernels.pallas import mosaic_fwd as mf

    n = _configs.CONFIGS[args.config].N
    spike = Spike("mosaic_spike", args.out, args.config, spatial=(args.zy or n, args.zy or n, n), batch=args.b)
    spec = spike.spec

    def mosaic(**variant):
        return spike.correct_and_time(lambda xs, ws: mf.mosaic_forward(spec, xs, ws, **variant), partial=True)

    spike.stage("reference", spike.reference)
    spike.stage("mosaic", mosaic())
    spike.stage("mosaic_shared_reads", mosaic(share_loads=True, auto_barriers=False))
    spike.stage("triton", spike.timed(spike.layer("triton")))
    spike.stage("dense", spike.timed(spike.layer("dense")))
    spike.stage("pad_rows", spike.timed(lambda xs, ws: (mf.pad_rows(xs[0], 0), mf.pad_rows(xs[1], 1))))
    spike.stage("mosaic_no_auto_barriers", mosaic(auto_barriers=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
