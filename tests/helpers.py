"""Helpers shared by test modules."""

PLANTED_DEFECTS = {
    "truncated_image": 3, "not_an_image": 3, "decompression_bomb": 2, "empty_image": 2, "image_missing": 2,
    "nan_attribute": 3, "negative_attribute": 2, "wrong_dtype": 2, "duplicate_id": 3,
}  # fmt: skip


def read_table(fs, path):
    """Every Parquet file under `path` of filesystem `fs`, as one DataFrame."""
    import io

    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    return pd.concat([pq.read_table(io.BytesIO(fs.cat_file(f))).to_pandas() for f in files], ignore_index=True)


def kill_driver_after_first_checkpoint(job: str, args: list[str], run_dir, s3_options: dict, ray_cluster) -> None:
    """Run `python -m jobs.<job> args` on the test cluster; SIGKILL it once Ray Train has registered a checkpoint."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    options = [f"storage_options.{k}={v}" for k, v in s3_options.items()]
    errors = tempfile.TemporaryFile()
    driver = subprocess.Popen(
        [sys.executable, "-m", f"jobs.{job}", *args, *options, f"ray.address={ray_cluster.get_runtime_context().gcs_address}"],
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
    deadline = time.time() + 480
    while not snapshot.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    errors.seek(0)
    assert snapshot.exists(), "the driver died before its first checkpoint:\n" + errors.read().decode(errors="replace")[-3000:]
    time.sleep(3)  # Ray stops the dead driver's trainer and workers
