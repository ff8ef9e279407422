"""Ray jobs on a hearth cluster, through Ray's own JobSubmissionClient with the cluster's token."""

from __future__ import annotations

import asyncio
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def job_client(dashboard_url: str, token: str) -> JobSubmissionClient:
    return JobSubmissionClient(dashboard_url, headers={"authorization": f"Bearer {token}"})


def follow(client: JobSubmissionClient, job_id: str, out=None, poll: float = 0.5) -> JobStatus:
    """Stream the job's logs to `out` (as `ray job submit` does) until it ends; return its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # no websocket to the dashboard: fall back to polling the whole log
        seen = 0
        while client.get_job_status(job_id) not in TERMINAL:
            logs = client.get_job_logs(job_id)
            out.write(logs[seen:])
            seen = len(logs)
            time.sleep(poll)
        out.write(client.get_job_logs(job_id)[seen:])
    status = client.get_job_status(job_id)
    while status not in TERMINAL:
        time.sleep(poll)
        status = client.get_job_status(job_id)
    return status
