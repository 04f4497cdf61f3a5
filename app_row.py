"""The BrightRun app's job row, written live: in the app's deployed flow, the worker's only channel to the app.

The app's pipeline flow never polls RunPod. It shows what the worker writes into the job's row of
`pipeline_training_jobs` in its Supabase database (through Supabase's REST API, PostgREST, with the service-role key),
charts what the worker writes into `pipeline_training_metrics`, and deploys the adapter once the row says `completed`
with `adapter_file_path` set. A user's Cancel only sets the row's status to `cancelled`.

- **The row stays the worker's only while its status says so.** Every write is an update conditional on the status
  being one of WORKER_STATUSES (or, for the claim at the start, a failure a worker wrote after SIGTERM, which a
  resubmission resumes). A row that someone else ended (`cancelled`, `completed`, `failed`) matches no row: the worker
  then reads the status, never writes the row again, and stops the job (`stopped_by`, `on_stop`).
- **Writes never hold up training.** They run in a thread of their own: the newest progress replaces one not yet
  written, metrics wait in a bounded buffer and go in batches. Timeouts, lost connections, 5xx and 429 are retried with
  backoff until SUPABASE_WRITE_DEADLINE_S, then that write is dropped (the next carries newer figures; metrics stay
  buffered). With nothing to write the thread still reads the status every POLL_S seconds, so a cancel is seen.
- **The last word lands.** `finish` writes `completed` or `failed` from the calling thread after the metrics, retried
  until SUPABASE_FINAL_DEADLINE_S; when it cannot land, it says why, and the job's RunPod result says so.
- **A deployment mistake shows at once.** `JobRow.open` reads the row once, authenticated, in the job's first second:
  a wrong key, URL or table is a JobError naming the variable to fix, before anything is downloaded. A row that does
  not exist (a legacy-flow job, a local run) is a warning; the job runs without it.

The client is supabase-py's own PostgREST client (`postgrest`) on an httpx client of ours: its errors do not carry
the HTTP status when the body is JSON (a 503 from the gateway reads like any other error), so a response hook records
the status, which decides what is retried. The client's own retries (GET only, up to 30 s sleeps) are off: the
deadlines here bound every write.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

import httpx
from postgrest import SyncPostgrestClient
from postgrest.exceptions import APIError

from job import JobError, redact_text, redact_url
from settings import WorkerSettings

log = logging.getLogger(__name__)

WORKER_STATUSES = ("pending", "queued", "initializing", "running")  # the app's statuses before a job's end
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
POLL_S = 30.0  # with nothing to write, the status is still read this often (a cancel is seen within it)
METRICS_BATCH = 500  # rows per insert
METRICS_BUFFER = 20_000  # rows waiting at most; beyond, the oldest are dropped (and counted)
REQUEST_TIMEOUT_S = 10.0
WORKER = "brightrun-lora-worker"  # error_details.written_by: a failure the worker wrote itself

# What each per-step figure is in the app's metrics table: metric_id -> (metric_name, unit)
METRICS = {"training_loss": ("Training loss", None), "learning_rate": ("Learning rate", None),
           "gradient_norm": ("Gradient norm", None), "validation_loss": ("Validation loss", None)}


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class _Transient(Exception):
    """A write worth trying again: a timeout, a lost connection, 5xx, 429."""


class JobRow:
    """The job's row in the app's table, and the thread that writes it (see the module's docstring)."""

    def __init__(self, settings: WorkerSettings, job_id: str, runpod_job_id: str | None,
                 on_stop: Callable[[str], None] = lambda status: None):
        self.settings, self.job_id, self.runpod_job_id, self.on_stop = settings, job_id, runpod_job_id, on_stop
        self.table, self.exists, self.stopped_by = settings.supabase_jobs_table, False, None
        self.warnings: list[str] = []
        key = settings.supabase_service_role_key
        self._local = threading.local()  # .status: the HTTP status of this thread's last answer (the response hook's)
        self._http = httpx.Client(
            base_url=f"{settings.supabase_url.rstrip('/')}/rest/v1",
            headers={"apikey": key, "Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0), follow_redirects=False,
            event_hooks={"response": [self._record_status]})
        self._rest = SyncPostgrestClient(f"{settings.supabase_url.rstrip('/')}/rest/v1", http_client=self._http,
                                         retry_enabled=False)
        self._io = threading.Lock()  # one request at a time on the client
        self._wake = threading.Condition()
        self._progress: dict | None = None
        self._metrics: list[dict] = []
        self._dropped_metrics = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_io = time.monotonic()

    def _record_status(self, response) -> None:
        self._local.status = response.status_code

    @property
    def _status(self) -> int | None:
        return getattr(self._local, "status", None)

    def _scrub(self, text: str) -> str:
        """Text for a message or a log: URLs and query values redacted, the service key never quoted."""
        return redact_text(text.replace(self.settings.supabase_service_role_key, "<SUPABASE_SERVICE_ROLE_KEY>"), 200)

    # ------------------------------------------------------------------ the first second

    @classmethod
    def open(cls, settings: WorkerSettings, job_id: str, runpod_job_id: str | None,
             on_stop: Callable[[str], None] = lambda status: None) -> "JobRow":
        """Read the row (one authenticated read: a wrong key, URL or table fails here) and claim it: `running`,
        `started_at`. Raises JobError when the app has already ended the job. The writer thread starts."""
        row = cls(settings, job_id, runpod_job_id, on_stop)
        try:
            return row._claim()
        except JobError:
            row.close()
            raise
        except Exception as exc:  # noqa: BLE001 - the claim's write not answered in time, or refused
            row.close()
            raise JobError(f"the app's job row {job_id} could not be claimed ({row._scrub(str(exc))}); check "
                           "SUPABASE_URL and resubmit", stage="starting") from None
        except BaseException:
            row.close()
            raise

    @classmethod
    def check_access(cls, settings: WorkerSettings) -> None:
        """One authenticated read of the jobs table (the worker's start): a JobError naming the variable to fix."""
        row = cls(settings, "access-check", None)
        try:
            row._read()
        finally:
            row._http.close()

    def _claim(self) -> "JobRow":
        """The claim: the row read, then `running` if it is still the worker's to write."""
        found = self._read()
        if found is None:
            self.warnings.append(
                f"the app's job row does not exist ({self.table} id={self.job_id}): a legacy-flow job or a local run; "
                "the job runs without reporting into the app's database")
            log.warning(self.warnings[-1])
            return self
        status, details = found.get("status"), found.get("error_details") or {}
        resumable = status == "failed" and isinstance(details, dict) and details.get("written_by") == WORKER \
            and details.get("resumable")
        if status in TERMINAL_STATUSES and not resumable:
            what = ("the user cancelled it" if status == "cancelled" else
                    f"the row is already {status!r}"
                    + (f" ({found.get('error_message')})" if found.get("error_message") else ""))
            raise JobError(f"the app has ended this job before it started ({what}; {self.table} id={self.job_id}): "
                           "nothing was downloaded or trained. Start a new job in the app", stage="starting")
        claim = self._update({"status": "running", "started_at": now(), "updated_at": now(), "error_message": None,
                              "error_details": None}, statuses=("failed",) if resumable else WORKER_STATUSES,
                             deadline=time.monotonic() + self.settings.supabase_write_deadline_s)
        if not claim:
            status = (self._read() or {}).get("status")
            raise JobError(f"the app's job row changed to {status!r} as the worker started; nothing was downloaded or "
                           "trained", stage="starting")
        self.exists = True
        self._thread = threading.Thread(target=self._writer, name="job-row", daemon=True)
        self._thread.start()
        log.info("the app's job row %s id=%s is this worker's: status running", self.table, self.job_id)
        return self

    def _read(self) -> dict | None:
        """The row (id, status, error_message, error_details), or None when there is none; failures name the variable
        to fix (this read is also the deployment's check)."""
        if not is_uuid(self.job_id):  # the app's ids are uuids; another id has no row (an `id=eq.` would be refused)
            query = self._rest.from_(self.table).select("id").limit(1)
        else:
            query = self._rest.from_(self.table).select("id,status,error_message,error_details").eq("id", self.job_id)
        try:
            with self._io:
                rows = query.execute().data
        except APIError as exc:
            raise self._refused("read", exc) from None
        except Exception as exc:  # noqa: BLE001 - httpx's transport errors: the URL, DNS, TLS, a timeout
            raise JobError("could not reach the app's database at "
                           f"SUPABASE_URL={redact_url(self.settings.supabase_url)} "
                           f"({type(exc).__name__}: {self._scrub(str(exc))}): check SUPABASE_URL (the project's URL, "
                           "https://<project-ref>.supabase.co). Nothing was downloaded or trained",
                           stage="starting") from None
        return rows[0] if rows and is_uuid(self.job_id) else None

    def _refused(self, what: str, exc) -> JobError:
        status, message = self._status, exc.message or exc.details or ""
        if status == 401 or "api key" in str(message).lower() or exc.code in ("PGRST301", "PGRST302"):
            fix = ("SUPABASE_SERVICE_ROLE_KEY is not accepted by the app's project: set it to the project's "
                   "service_role key (Supabase dashboard: Settings, API)")
        elif exc.code == "PGRST205" or status == 404:
            fix = (f"the table {self.table!r} is not in the app's database: check SUPABASE_URL (the app's project) and "
                   "SUPABASE_JOBS_TABLE")
        else:
            fix = "check SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"
        return JobError(f"the app's database refused the {what} of job row {self.job_id} (HTTP {status}, {exc.code}: "
                        f"{self._scrub(str(message))}); {fix}. Nothing was downloaded or trained", stage="starting")

    # ------------------------------------------------------------------ writes

    def _call(self, request):
        """One request: its data, [] for a refused one that no retry would change, or _Transient."""
        self._local.status = None
        try:
            with self._io:
                self._last_io = time.monotonic()
                return request.execute().data
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _Transient(f"{type(exc).__name__}: {self._scrub(str(exc))}") from None
        except APIError as exc:
            if self._status is None or self._status == 429 or self._status >= 500:
                raise _Transient(f"HTTP {self._status}: {self._scrub(str(exc.message or exc.details))}") from None
            raise

    def _retried(self, request, deadline: float):
        """`request` until it answers or `deadline` (monotonic) passes; raises _Transient then. In the writer thread,
        closing the row ends the retries (the final write, on the closing thread, supersedes what it was writing)."""
        delay = 0.5
        while True:
            try:
                return self._call(request)
            except _Transient as exc:
                if (time.monotonic() + delay > deadline
                        or (self._closing and threading.current_thread() is self._thread)):
                    raise
                log.warning("the app's job row: %s; retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _update(self, values: dict, statuses=WORKER_STATUSES, deadline: float | None = None) -> bool:
        """Write `values` if the row's status is one of `statuses`; False when it is not (the row is not ours)."""
        request = self._rest.from_(self.table).update(values).eq("id", self.job_id).in_("status", list(statuses))
        return bool(self._retried(request, deadline or time.monotonic() + self.settings.supabase_write_deadline_s))

    def _lost(self) -> None:
        """An update matched no row: read why, and stop writing (and the job) when the row was ended or removed."""
        try:
            row = self._read()
        except JobError as exc:
            log.warning("the app's job row could not be read: %s", exc)
            return
        status = row.get("status") if row else "deleted"
        if status in WORKER_STATUSES:
            return  # changed back and forth (the dispatcher's own write): the next update lands
        self.stopped_by = status
        log.warning("the app's job row is now %r: the worker stops the job and writes the row no more", status)
        self.on_stop(status)

    def progress(self, payload: dict) -> None:
        """The newest progress (the ProgressReporter's payload), to be written by the thread."""
        if not self.exists:
            return
        metrics = payload.get("metrics") or {}
        values = {"status": "running", "progress": max(0, min(99, int(payload.get("progress") or 0))),
                  "current_epoch": payload.get("current_epoch"), "current_step": payload.get("current_step"),
                  "total_steps": payload.get("total_steps")}
        for column, name in (("current_loss", "training_loss"), ("current_learning_rate", "learning_rate"),
                             ("tokens_per_second", "throughput")):
            if _finite(metrics.get(name)):
                values[column] = metrics[name]
        with self._wake:
            self._progress = {k: v for k, v in values.items() if v is not None or k == "total_steps"}
            self._wake.notify()

    def metrics(self, event: dict) -> None:
        """A training step's figures (and an epoch's validation loss) as rows of the app's metrics table."""
        if not self.exists or "grad_norm" not in event:  # a step that ran (not a resumed one restated)
            return
        rows = [{"job_id": self.job_id, "metric_id": metric_id, "metric_name": METRICS[metric_id][0],
                 "metric_level": "universal", "value": float(event[key]), "unit": METRICS[metric_id][1],
                 "step_number": event["step"], "epoch_number": event.get("epoch"), "measured_at": now(),
                 "measurement_method": WORKER}
                for metric_id, key in (("training_loss", "loss"), ("learning_rate", "learning_rate"),
                                       ("gradient_norm", "grad_norm"), ("validation_loss", "validation_loss"))
                if _finite(event.get(key))]
        with self._wake:
            self._metrics += rows
            if len(self._metrics) > METRICS_BUFFER:
                self._dropped_metrics += len(self._metrics) - METRICS_BUFFER
                del self._metrics[:len(self._metrics) - METRICS_BUFFER]
            if len(self._metrics) >= METRICS_BATCH:
                self._wake.notify()

    def _flush_metrics(self, deadline: float) -> None:
        while True:
            with self._wake:
                batch = self._metrics[:METRICS_BATCH]
            if not batch:
                return
            try:
                self._retried(self._rest.from_(self.settings.supabase_metrics_table).insert(batch, returning="minimal"),
                              deadline)
            except APIError as exc:  # refused for good (a column the table lacks): logged once, never retried
                log.warning("the app's metrics table refused %d rows (%s: %s); they are dropped", len(batch), exc.code,
                            redact_text(str(exc.message), 200))
            with self._wake:
                del self._metrics[:len(batch)]

    def _writer(self) -> None:
        """The thread: metrics in batches, the newest progress, the status read at least every POLL_S seconds."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or self._progress is not None
                                    or len(self._metrics) >= METRICS_BATCH, timeout=POLL_S)
                if self._closing:
                    return
                progress, self._progress = self._progress, None
            deadline = time.monotonic() + self.settings.supabase_write_deadline_s
            try:
                if progress is not None or self._metrics:
                    self._flush_metrics(deadline)
                if progress is not None:
                    if not self._update({**progress, "updated_at": now()}, deadline=deadline):
                        self._lost()
                elif (time.monotonic() - self._last_io >= POLL_S
                      and (self._read() or {}).get("status") not in WORKER_STATUSES):
                    self._lost()
            except _Transient as exc:
                log.warning("the app's job row was not updated (%s); training goes on, the next write carries newer "
                            "figures", exc)
            except (APIError, JobError) as exc:
                log.warning("the app's job row refused a write: %s", self._scrub(str(getattr(exc, "message", exc))))
            except Exception as exc:  # noqa: BLE001 - the thread must live on: it is what notices a cancel
                log.warning("the app's job row: %s: %s", type(exc).__name__, self._scrub(str(exc)))
            if self.stopped_by:
                return

    # ------------------------------------------------------------------ the end

    def finish(self, values: dict, deadline_s: float | None = None) -> str | None:
        """The final write (`completed` or `failed` with their columns), after the buffered metrics; retried until the
        deadline. Returns None once it landed, else why it did not (nothing is written over a row someone else
        ended)."""
        try:
            return self._finish(values, deadline_s)
        finally:
            self._http.close()

    def _finish(self, values: dict, deadline_s: float | None) -> str | None:
        if self._thread is not None:
            with self._wake:
                self._closing = True
                self._wake.notify()
            self._thread.join()  # its request ends within REQUEST_TIMEOUT_S, and it retries no more once closing
        if not self.exists:
            return None
        if self.stopped_by:
            return f"the row is {self.stopped_by!r} (set by the app): the worker did not write over it"
        deadline_s = deadline_s or self.settings.supabase_final_deadline_s
        deadline = time.monotonic() + deadline_s
        try:
            # the metrics must not cost the final write its chance
            self._flush_metrics(time.monotonic() + deadline_s / 2)
        except _Transient as exc:
            log.warning("%d metric rows could not be written (%s)", len(self._metrics), exc)
        if self._dropped_metrics:
            log.warning("%d metric rows were dropped while the app's database could not take them",
                        self._dropped_metrics)
        try:
            if self._update({**values, "updated_at": now(), "completed_at": now()}, deadline=deadline):
                log.info("the app's job row %s id=%s: %s", self.table, self.job_id, values.get("status"))
                return None
            self._lost()
            return f"the row is {self.stopped_by!r} (set by the app): the worker did not write over it"
        except _Transient as exc:
            return f"the app's database did not answer for {deadline_s:g} s ({exc})"
        except APIError as exc:
            return f"the app's database refused it ({exc.code}: {self._scrub(str(exc.message))})"
        except Exception as exc:  # noqa: BLE001 - a value the client cannot send (NaN), a client closed: said, not raised
            return f"{type(exc).__name__}: {self._scrub(str(exc))}"

    def close(self) -> None:
        """Stop the thread without a final write (the app ended the job, or there is no row to write)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._http.close()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
