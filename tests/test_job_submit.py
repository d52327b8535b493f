"""`ray job submit`, for real: a head started with `ray start --head`, a job submitted through the Jobs API.

The job is sent the way the README tells people to send one to a cluster: the repository as
`working_dir` (the jobs and configs, minus .venv, out, .git and caches) and the library as
`py_modules`, so the job runs the submitted code, not whatever is installed on the nodes. It
is the main job cut short (synthetic lesions, ingest, report); the test follows it to
SUCCEEDED and reads what it wrote.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.ray_nodes import RAY, node_env, start_cluster

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", "out", ".cache", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "benchmarks"]


@pytest.fixture(scope="module")
def head():
    cluster = start_cluster(head_cpus=2)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_submitted_job_runs_the_submitted_code_to_success(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    where = "import dermaray.config, jobs; print('CODE', jobs.__file__, dermaray.config.__file__)"
    entrypoint = " && ".join(
        [  # the main job, cut to synth + ingest + report, with the config file that travels along
            f'python -c "{where}"',
            f"python -m jobs.pipeline --config configs/local.yaml pipeline.workdir={tmp_path} pipeline.shifted_lesions=0 "
            "synth.n_lesions=40 synth.shard_size=20 'pipeline.stages=[synth,ingest,report]'",
        ]
    )
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO),
            "excludes": EXCLUDES,
            "py_modules": [str(REPO / "platform" / "dermaray")],
            "env_vars": {"HF_HUB_OFFLINE": "1"},
        },
    )
    deadline, status = time.time() + 240, None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        client.stop_job(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} ended {status}:\n{logs[-3000:]}"

    # The submitted copies ran: both unpacked from the uploaded packages, not imported from this checkout.
    code = next(line for line in logs.splitlines() if line.startswith("CODE ")).split()[1:]
    assert all("runtime_resources" in path and not path.startswith(str(REPO)) for path in code), code
    summary = json.loads((tmp_path / "ingest" / "clinic" / "ingest_summary.json").read_text())
    planted = json.loads((tmp_path / "synthetic" / "clinic" / "synth_manifest.json").read_text())["planted"]
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_quarantined"] == 40 + 2  # 2 planted duplicate rows
    assert summary["rows_quarantined"] == len(planted) == 15
    assert "Run summary" in (tmp_path / "reports" / "report.html").read_text()
    assert client.get_job_info(job).runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on the head


def test_a_head_with_token_authentication_takes_jobs_only_with_its_token():
    """README's way on Ray 2.60: the head started with RAY_AUTH_MODE=token and the token in a file; the
    submitting machine sets RAY_AUTH_MODE=token and has the same token. Without it, or with another, refused."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster = start_cluster(head_cpus=1, auth=True)
    try:
        # The driver joins the cluster too (ray.init on the head): the token reached the node's processes.
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--",
            "python",
            "-c",
            "import ray; ray.init(); print('JOINED', len(ray.nodes()))",
        ]
        ran = subprocess.run(submit, env={**node_env(), **cluster.auth_env}, capture_output=True, text=True, timeout=180)
        assert ran.returncode == 0 and "JOINED 1" in ran.stdout, ran.stdout[-2000:] + ran.stderr[-2000:]

        refused = subprocess.run(submit, env=node_env(), capture_output=True, text=True, timeout=120)  # RAY_AUTH_MODE=disabled
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr

        with pytest.raises(AuthenticationError, match="Authentication required"):
            JobSubmissionClient(cluster.dashboard_url).submit_job(entrypoint="echo no token")
        with pytest.raises(AuthenticationError, match="Authentication failed"):
            JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer " + "0" * 64}).submit_job(
                entrypoint="echo"
            )
        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)
        jobs = client.list_jobs()
        assert [j.status for j in jobs] == [JobStatus.SUCCEEDED], "only the job sent with the token was taken"
    finally:
        cluster.shutdown()
