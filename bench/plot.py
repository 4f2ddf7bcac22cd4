"""PNG plot of a results file: speedup vs the reference backend (or `dense`, in a run without the
reference) against grid size, per backend.

    python -m bench.plot RESULTS.json [OUT.png]

matplotlib is optional (`pip install matplotlib`, or the project's `plot` extra); without it the
plot is skipped with a message and everything else still works.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional

from bench import _suite

MISSING_MATPLOTLIB = "matplotlib is not installed, so no PNG plot was written (pip install matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def speedup_rows(results: dict) -> tuple[str, list[dict]]:
    """(baseline, rows to plot): the baseline is `reference` where the run has it, else `dense`
    (GPU runs often leave the slow reference out); a row is plotted when it has a speedup over
    the baseline and a grid size, the baseline's own rows excepted."""
    rows = _suite.table_rows(results)
    baseline = "reference" if any(r["backend"] == "reference" for r in rows) else "dense"
    return baseline, [
        r for r in rows if r[f"vs_{baseline}"] is not None and r["pixels"] and r["backend"] != baseline
    ]


def plot_speedups(results: dict, path, title: Optional[str] = None) -> bool:
    """Write the plot to `path`; False (nothing written) when matplotlib is missing.

    One panel per mode; x: cells per sample (N^D, log scale), y: median speedup over the
    baseline (`speedup_rows`) on the same config; one line per backend, configs labelled at their
    points.
    """
    if not have_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    baseline, rows = speedup_rows(results)
    modes = [m for m in ("fwd", "fwd_bwd", "step") if any(r["mode"] == m for r in rows)] or ["fwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    backends = sorted({r["backend"] for r in rows}, key=_suite.backend_order)
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    markers = {2: "s", 3: "o"}
    for ax, mode in zip(axes[0], modes):
        labelled = set()
        for backend in backends:
            for D in sorted({r["D"] for r in rows}):
                # one line per (backend, D); configs of one D differ in N, B and c
                pts = sorted(
                    (r["pixels"], r[f"vs_{baseline}"], r["config"])
                    for r in rows
                    if r["mode"] == mode and r["backend"] == backend and r["D"] == D
                )
                if not pts:
                    continue
                xs, ys, _ = zip(*pts)
                ax.plot(xs, ys, color=colors[backend], marker=markers.get(D, "^"), label=f"{backend} (D={D})")
                for x, y, name in pts:
                    if name not in labelled:
                        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                        labelled.add(name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label=baseline)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid cells per sample (N^D)")
        ax.set_ylabel(f"speedup vs {baseline} backend (median)")
        ax.set_title(mode)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or _suite.describe_run(results), fontsize=8)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) > 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        results = _suite.load_results(argv[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = argv[1] if len(argv) == 2 else str(pathlib.Path(argv[0]).with_suffix(".png"))
    if not plot_speedups(results, out):
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
