"""Agreement of one model train step across backends and precisions, for the GPU machine.

    python3 bench/model_check.py [--config dilresnet_d3_n64_b4] [--backends auto,dense]

For each precision (JAX's default, i.e. TF32 on a GPU, then 'highest', i.e. fp32), the step
(value_and_grad of the bench's MSE loss: the loss and every parameter gradient) runs on
`reference` and on each backend; the relative L2 error of the whole result against `reference`
at the same precision is printed, so that a kernel error (large at both precisions) can be told
from TF32 rounding compounding through a deep network (small at fp32). Prints one JSON line per
(precision, backend) and a summary.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _cases, _configs, _errors, _timing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="dilresnet_d3_n64_b4", choices=[c.name for c in _configs.MODEL_CONFIGS])
    ap.add_argument("--backends", default="auto,dense")
    ap.add_argument("--precisions", default="default,highest")
    args = ap.parse_args(argv)
    case = _cases.build_case(_configs.CONFIGS[args.config])
    fn, fargs = case.function("step")
    rows = []
    for precision in args.precisions.split(","):
        prec = None if precision == "default" else precision
        results = {}
        for backend in ["reference"] + args.backends.split(","):
            start = time.perf_counter()
            compiled = _timing.compile_for(fn, fargs, backend, precision=prec)
            results[backend] = jax.block_until_ready(compiled(*fargs))
            seconds = time.perf_counter() - start
            row = dict(config=args.config, precision=precision, backend=backend, seconds=round(seconds, 1))
            if backend != "reference":
                err, _ = _errors.rel_err_detail(results[backend], results["reference"], per_array=False)
                row["rel_err_vs_reference"] = float(err)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del results
    print(f"\n{args.config}: relative L2 error of the train step (loss and all gradients) vs reference")
    for r in rows:
        if "rel_err_vs_reference" in r:
            print(f"  {r['precision']:8s} {r['backend']:10s} {r['rel_err_vs_reference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
