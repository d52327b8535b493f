"""Ray jobs: each wires a pure core from `dermaray` to Ray Data / Ray Train / Ray Serve.

Run one from the repository root with `python -m jobs <stage> [--config FILE] [key=value ...]` or
`python -m jobs.<stage> ...`, or under `ray job submit` (the repository as working_dir).
"""
