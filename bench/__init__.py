"""Benchmarks of ginjax's ConvContract and models across kernel backends.

    pytest bench/                      # the pytest-benchmark suite (quick set on CPU)
    python -m bench [--out DIR]        # the A/B table (+ JSON and PNG under DIR)
    python -m bench compare [OLD] [NEW] [--threshold 0.10]

Importing this package is cheap (no jax): `compare` runs without a device.
"""
