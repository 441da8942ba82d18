"""bn_cuda's benchmark harness (importable; the CLI is ``python -m benchmarks.bench``).

Modules: :mod:`.presets` (shape sets), :mod:`.bytes_model` (minimum traffic per mode),
:mod:`.timing` (the one timer), :mod:`.impls` (bn_cuda and the baselines), :mod:`.runner`
(check then time a case), :mod:`.report` (table, CSV, JSON, chart), :mod:`.machine` (machine info),
:mod:`.bench` (the CLI and :func:`benchmarks.bench.run`).
"""

__all__ = ["bench", "bytes_model", "impls", "machine", "presets", "report", "runner", "timing"]
