"""The Celery submitter: plan the job, record it on disk, queue only the missing chunks, follow to the publish.

The follower reads the run state from disk (chunk files, failures, the published version), so it shows the
same truth as `embedctl status` and survives a Redis restart; Ctrl-C leaves the job running on the workers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from jobs import state
from jobs.runner import plan_job
from jobs.spec import JobSpec
from pipeline.errors import BrokerError, EmbedctlError
from pipeline.plan import WorkPlan
from pipeline.work import ProgressFactory, missing_chunks, no_progress
from tasks.settings import Settings, mask_url, url_password

LOG = logging.getLogger(__name__)

STALL_HINT_SECONDS = 120
"""Without a completed chunk for this long, the follower says how to check the workers."""


class JobFailed(EmbedctlError):
    """A chunk or the build of a distributed job failed for good."""


@dataclass
class Submitted:
    plan: WorkPlan
    missing: list[int]
    build_submitted: bool
    up_to_date: dict | None = None

    @property
    def chunks_submitted(self) -> int:
        return len(self.missing)

    @property
    def chunks_done_before(self) -> int:
        return len(self.plan.corpus.chunks) - len(self.missing)

    def to_dict(self) -> dict:
        return {"job_id": self.plan.plan_id, "out": self.plan.out, "work_dir": str(self.plan.work_dir),
                "chunks_total": len(self.plan.corpus.chunks), "chunks_submitted": self.chunks_submitted,
                "chunks_done_before": self.chunks_done_before, "status": "up-to-date" if self.up_to_date
                else "submitted"}


def check_broker(settings: Settings, timeout: float = 5.0) -> None:
    """Ping the Redis broker; raise BrokerError (one line, password masked) when it cannot be used."""
    import redis

    masked = settings.masked_broker
    try:
        redis.Redis.from_url(settings.broker_url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError):
        if url_password(settings.broker_url) is None:
            raise BrokerError(f"the broker at {masked} requires a password: put it in the URL "
                              "(redis://:PASSWORD@host:port/db)") from None
        raise BrokerError(f"the broker at {masked} refused the password; check the password in --broker / "
                          "EMBEDCTL_BROKER_URL") from None
    except redis.ResponseError as exc:
        reason = _clean(str(exc), settings.broker_url)
        if "NOAUTH" in reason or "AUTH" in reason:
            raise BrokerError(f"the broker at {masked} requires a password: put it in the URL "
                              "(redis://:PASSWORD@host:port/db)") from None
        raise BrokerError(f"the broker at {masked} answered with an error ({reason})") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
        reason = _clean(str(exc), settings.broker_url) or type(exc).__name__
        raise BrokerError(f"cannot reach the broker at {masked} ({reason}); is Redis running there? Check "
                          "--broker / EMBEDCTL_BROKER_URL") from None


def _clean(text: str, url: str) -> str:
    password = url_password(url)
    text = " ".join(mask_url(text).split())
    return text.replace(password, "***") if password else text


def submit(spec: JobSpec, settings: Settings, **job_fields) -> Submitted:
    """Plan `spec`, record the job, and queue its missing chunks (or its build, when all chunks are done)."""
    from tasks.app import app, configure
    from tasks.embed import build_index, embed_chunk

    check_broker(settings)
    configure(app, settings)
    plan = plan_job(spec)
    published = state.published_info(plan)
    if published:
        return Submitted(plan, [], False, up_to_date=published)
    state.write_job(plan, mode="celery", broker=settings.masked_broker, keep=spec.keep, **job_fields)
    missing = missing_chunks(plan)
    work_dir = str(plan.work_dir)
    try:
        with app.producer_or_acquire() as producer:
            for number in missing:
                embed_chunk.apply_async((work_dir, number), producer=producer)
            if not missing:
                build_index.apply_async((work_dir,), producer=producer)
    except Exception as exc:  # noqa: BLE001 - kombu/redis errors become one line
        raise BrokerError(f"cannot queue the job on {settings.masked_broker}: "
                          f"{_clean(str(exc), settings.broker_url)}") from None
    LOG.info("job %s: queued %d chunks on %s", plan.plan_id, len(missing), settings.masked_broker)
    return Submitted(plan, missing, not missing)


def follow(submitted: Submitted, progress: ProgressFactory = no_progress, poll: float = 0.5,
           timeout: float | None = None) -> dict:
    """Show progress until the job's version is published; raise JobFailed when a chunk or the build fails."""
    plan = submitted.plan
    total_chunks = len(plan.corpus.chunks)
    t0 = time.monotonic()
    chunks, rows = state.progress(plan)
    last_change = time.monotonic()
    embedded_at = None
    hinted = False
    with progress("embed", plan.corpus.rows, "rows", rows) as update:
        while True:
            failed = state.failures(plan)
            if failed:
                raise JobFailed(f"job {plan.plan_id} failed: {failed[0]['error']}; fix the cause and run the same "
                                "command again (complete chunks are kept)")
            published = state.published_info(plan)
            if published and _report_of(plan, published["version"]):
                break  # the build task writes the run report right after the swap: wait for it too
            now_chunks, now_rows = state.progress(plan)
            if now_rows != rows:
                update(now_rows - rows)
                last_change = time.monotonic()
            chunks, rows = now_chunks, now_rows
            if chunks == total_chunks and embedded_at is None:
                embedded_at = time.monotonic()
            stage = "building indexes" if chunks == total_chunks else f"chunks {chunks}/{total_chunks}"
            getattr(update, "note", lambda _s: None)(stage)
            if not hinted and time.monotonic() - last_change > STALL_HINT_SECONDS:
                hinted = True
                LOG.warning("no progress for %d s: are workers consuming the embed queue? Ctrl-C leaves the job "
                            "queued; running the same command again re-queues the missing chunks",
                            STALL_HINT_SECONDS)
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise JobFailed(f"job {plan.plan_id} did not finish within {timeout:.0f} s; it keeps running on the "
                                f"workers: follow it with `embedctl status {plan.out}`")
            time.sleep(poll)
    report = _report_of(plan, state.published_info(plan)["version"])
    seconds = time.monotonic() - t0
    chunk_reports = [plan.store.read_report(k) for k in submitted.missing]
    embedded = sum(r["embedded"] for r in chunk_reports)
    return {**report, "status": "published", "job_id": plan.plan_id, "mode": "celery",
            "chunks_total": total_chunks, "chunks_embedded": submitted.chunks_submitted,
            "chunks_done_before": submitted.chunks_done_before, "rows_embedded": embedded,
            "rows_reused": sum(r["reused"] for r in chunk_reports),
            "follow_seconds": round(seconds, 3),
            "embed_seconds": round((embedded_at or time.monotonic()) - t0, 3),
            "rows_per_second": round(embedded / ((embedded_at or time.monotonic()) - t0), 1) if embedded else None}


def _report_of(plan: WorkPlan, version: str) -> dict | None:
    """The run report of `plan` when it describes `version` (an older one may be left from an earlier build)."""
    from pipeline.fsutil import read_json

    path = plan.work_dir / state.REPORT_FILE
    try:
        report = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return report if report.get("version") == version else None
