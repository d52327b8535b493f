"""Ray jobs: each wires a pure core from `dermaray` to Ray Data / Ray Train / Ray Serve.

Run one with `python -m jobs.<stage> [--config FILE] [key=value ...]`, `dermaray <stage> ...`,
or under `ray job submit`.
"""
