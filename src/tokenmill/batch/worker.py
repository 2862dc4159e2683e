"""The job loop: validating -> in_progress -> finalizing -> completed (or failed / cancelled / expired).

One asyncio task per active batch, all sharing one bound on lines in the engine (BatchConfig.max_inflight),
so a batch never takes more than its share of max_num_seqs. Lines go in at BatchConfig.priority (larger =
later), so the scheduler serves interactive requests (priority 0) first. While interactive requests are in
flight, new lines wait until fewer than BatchConfig.max_inflight_shared batch lines run: priority orders the
queue, but every running line still adds to each step's time. Every state lives in the store:
on a restart the loop finds the active batches again and resumes each from its status, rerunning only the
lines without a committed result. A line cut off by shutdown or cancel leaves no result, so it is rerun.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from tokenmill.batch.execute import execute_line
from tokenmill.batch.store import BatchDirBusy, BatchStore, new_id
from tokenmill.batch.validate import (
    BatchLine,
    BatchValidationError,
    LineError,
    read_lines,
    validate_file,
)
from tokenmill.config import BatchConfig
from tokenmill.model.cache_dir import cache_root
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.batch")

_RETRY_STATUSES = (429, 503)  # the server is busy or (re)loading: the line runs later, it has not failed
_RETRY_S = 0.5
_POLL_S = 1.0  # the loop also wakes on create / cancel; the poll catches expiry
_SHARE_POLL_S = 0.02  # how often in_flight_seqs is sampled for interactive traffic (no event marks it)
# Interactive traffic counts as present this long after it was last seen. A batch line is counted as ours from
# its start, but admit() counts it only after tokenization (off the loop) and uncounts it before the line
# returns, so one reading can miss an interactive request; the hold also keeps the batch from refilling in
# the short gaps of a steady interactive load.
_INTERACTIVE_HOLD_S = 1.0


def max_inflight(state: ServerState, config: BatchConfig) -> int:
    return config.max_inflight or max(1, state.engine_config.scheduler.max_num_seqs // 2)


def output_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """One line of the output / error file, as OpenAI writes it."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


def line_num_seqs(endpoint: str, body: dict[str, Any]) -> int:
    """Sequences admit() reserves for a line: n per prompt (embeddings reserve none)."""
    if endpoint == "/v1/embeddings":
        return 0
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    prompt = body.get("prompt") if endpoint == "/v1/completions" else None
    many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    return n * (len(prompt) if many else 1)


class BatchWorker:
    def __init__(self, state: ServerState, store: BatchStore, config: BatchConfig) -> None:
        self.state, self.store, self.config = state, store, config
        self._slots = asyncio.Semaphore(max_inflight(state, config))
        self.num_inflight_lines = 0  # batch lines inside execute_line, all jobs
        self._num_inflight_seqs = 0  # their sequences, as admit() counts them into state.in_flight_seqs
        self._interactive_until = 0.0  # monotonic time until which interactive traffic counts as present
        self._jobs: dict[str, asyncio.Task] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._lines_started = asyncio.Event()  # set while batch lines run: the interactive watch samples only then
        self._loop_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())
        self._watch_task = asyncio.create_task(self._watch_interactive())

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, bid: str) -> None:
        """The store already says `cancelling`; stop the job's lines now rather than at the next poll."""
        if bid in self._cancel:
            self._cancel[bid].set()
        self.wake()

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, self._watch_task, *self._jobs.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            for bid in await asyncio.to_thread(self.store.active_batch_ids):
                if bid not in self._jobs and not self.state.draining:
                    self._cancel[bid] = asyncio.Event()
                    self._jobs[bid] = asyncio.create_task(self._job(bid))
            try:
                await asyncio.wait_for(self._wake.wait(), _POLL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _job(self, bid: str) -> None:
        try:
            await self._advance(bid)
        except asyncio.CancelledError:
            raise
        except Exception:  # one job's bug must not stop the others; it is retried next poll
            log.exception("batch %s failed to advance", bid)
        finally:
            self._jobs.pop(bid, None)
            self._cancel.pop(bid, None)

    async def _advance(self, bid: str) -> None:
        """Step the batch through its statuses until it ends or waits for a restart (each step moves it on)."""
        while True:
            batch = await asyncio.to_thread(self.store.get_batch, bid)
            status = batch["status"]
            if status == "validating":
                await self._validate(batch)
            elif status == "in_progress":
                if await self._run_lines(batch):
                    await self._finish(batch, "expired")
                    return
                await asyncio.to_thread(self.store.update_batch, bid, status="finalizing",
                                        finalizing_at=int(time.time()), only_from=("in_progress",))
            elif status in ("finalizing", "cancelling"):
                await self._finish(batch, "completed" if status == "finalizing" else "cancelled")
                return
            else:
                return

    async def _validate(self, batch: dict[str, Any]) -> bool:
        path = self.store.file_path(batch["input_file_id"])
        now = int(time.time())
        try:
            lines = await asyncio.to_thread(validate_file, path, batch["endpoint"], self.config)
        except BatchValidationError as exc:
            log.info("batch %s failed validation: %s", batch["id"], exc)
            await asyncio.to_thread(self.store.update_batch, batch["id"], status="failed", failed_at=now,
                                    errors=exc.to_json(), only_from=("validating",))
            return False
        except FileNotFoundError:
            err = LineError("invalid_file", "The input file was deleted before the batch started.", "input_file_id")
            await asyncio.to_thread(self.store.update_batch, batch["id"], status="failed", failed_at=now,
                                    errors=BatchValidationError([err]).to_json(), only_from=("validating",))
            return False
        return await asyncio.to_thread(self.store.update_batch, batch["id"], status="in_progress", in_progress_at=now,
                                       total=len(lines), only_from=("validating",))

    async def _run_lines(self, batch: dict[str, Any]) -> bool:
        """Run every line without a result; returns True if the completion window ran out first."""
        bid = batch["id"]
        lines = await asyncio.to_thread(read_lines, self.store.file_path(batch["input_file_id"]))
        done = await asyncio.to_thread(self.store.done_custom_ids, bid)
        todo = [ln for ln in lines if ln.custom_id not in done]
        cancelled = self._cancel[bid]
        running: set[asyncio.Task] = set()
        try:
            for line in todo:
                if not await self._acquire(cancelled):
                    break
                if self.state.draining or time.time() >= batch["expires_at"]:
                    self._slots.release()
                    break
                task = asyncio.create_task(self._run_line(bid, batch["endpoint"], line))
                self.num_inflight_lines += 1  # now, not when the task starts: the next _must_share counts it
                self._lines_started.set()
                running.add(task)
                task.add_done_callback(running.discard)
                # In a callback, not the task's finally: a task cancelled before its first step runs no
                # finally, and its slot would be lost for good.
                task.add_done_callback(self._line_done)
            await _wait_or_cancel(running, cancelled)
        finally:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if self.state.draining:
            raise asyncio.CancelledError("server shutting down")  # resumed on the next start
        return not cancelled.is_set() and time.time() >= batch["expires_at"]

    def interactive_seqs(self) -> int:
        """Sequences in flight that are not this worker's lines (interactive requests)."""
        return self.state.in_flight_seqs - self._num_inflight_seqs

    def _note_interactive(self) -> bool:
        if self.interactive_seqs() > 0:
            self._interactive_until = time.monotonic() + _INTERACTIVE_HOLD_S
        return time.monotonic() < self._interactive_until

    def _must_share(self) -> bool:
        return self._note_interactive() and self.num_inflight_lines >= self.config.max_inflight_shared

    async def _watch_interactive(self) -> None:
        """Sample for interactive traffic while batch lines run (a reading at the next turn alone can miss it)."""
        while True:
            if not self.num_inflight_lines:
                # Idle until a line starts: a 20 ms timer in a server with no batch work would wake it 50 times a
                # second, each time taking a core from the engine on a small machine.
                self._lines_started.clear()
                await self._lines_started.wait()
            self._note_interactive()
            await asyncio.sleep(_SHARE_POLL_S)

    async def _acquire(self, cancelled: asyncio.Event) -> bool:
        """A line slot and a turn (see _must_share), or False (holding no slot) once the batch is cancelled."""
        if not await self._acquire_slot(cancelled):
            return False
        while self._must_share() and not cancelled.is_set() and not self.state.draining:
            await asyncio.sleep(_SHARE_POLL_S)
        if cancelled.is_set():
            self._slots.release()
            return False
        return True

    async def _acquire_slot(self, cancelled: asyncio.Event) -> bool:
        """A line slot, or False (holding none) once the batch is cancelled."""
        slot, stop = asyncio.create_task(self._slots.acquire()), asyncio.create_task(cancelled.wait())
        await asyncio.wait({slot, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not slot.done():
            slot.cancel()
            await asyncio.gather(slot, return_exceptions=True)
        got = slot.done() and not slot.cancelled()
        if got and cancelled.is_set():
            self._slots.release()
            return False
        return got

    async def _run_line(self, bid: str, endpoint: str, line: BatchLine) -> None:
        num_seqs = line_num_seqs(endpoint, line.body)
        while True:
            await self._engine_ready()
            self._num_inflight_seqs += num_seqs
            try:
                status, body = await execute_line(self.state, endpoint, line.body,
                                                  priority=self.config.priority)
            finally:
                self._num_inflight_seqs -= num_seqs
            if status not in _RETRY_STATUSES:
                break
            await asyncio.sleep(_RETRY_S)
        out = output_line(line.custom_id, status, body)
        commit = asyncio.ensure_future(asyncio.to_thread(self.store.record_result, bid, line.custom_id,
                                                         line.line, 200 <= status < 300, out))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await commit  # a commit under way lands before the job reads its rows to finish
            raise

    def _line_done(self, _task: asyncio.Task) -> None:
        self.num_inflight_lines -= 1
        self._slots.release()

    async def _engine_ready(self) -> None:
        while self.state.engine is None or self.state.engine.errored or self.state.draining:
            await asyncio.sleep(_RETRY_S)

    async def _finish(self, batch: dict[str, Any], status: str) -> None:
        bid = batch["id"]
        if status == "expired":  # OpenAI reports each request the window cut off in the error file
            lines = await asyncio.to_thread(read_lines, self.store.file_path(batch["input_file_id"]))
            done = await asyncio.to_thread(self.store.done_custom_ids, bid)
            for ln in lines:
                if ln.custom_id not in done:
                    out = {"id": new_id("batch_req_"), "custom_id": ln.custom_id, "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed "
                                     "before the completion window expired."}}
                    await asyncio.to_thread(self.store.record_result, bid, ln.custom_id, ln.line, False, out)
        ok = await asyncio.to_thread(lambda: list(self.store.iter_results(bid, True)))
        failed = await asyncio.to_thread(lambda: list(self.store.iter_results(bid, False)))
        await asyncio.to_thread(self.store.finish, bid, status, ok, failed)
        log.info("batch %s %s: %d ok, %d failed", bid, status, len(ok), len(failed))


async def _wait_or_cancel(running: set[asyncio.Task], cancelled: asyncio.Event) -> None:
    """Wait for the running lines, or until the batch is cancelled (the caller cancels what is left)."""
    waiter = asyncio.create_task(cancelled.wait())
    try:
        while running and not cancelled.is_set():
            await asyncio.wait({*running, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()



def batch_dir(config: BatchConfig) -> Path:
    return Path(config.batch_dir).expanduser() if config.batch_dir else cache_root() / "batches"


def start_batches(state: ServerState) -> None:
    """Open the store and start the job loop (resuming any active batch) in the running event loop.

    A directory owned by another live server leaves this one without the Batch API (503 naming the
    directory) rather than failing to start: its interactive endpoints are unaffected."""
    config = state.server_config.batch
    try:
        store = BatchStore(batch_dir(config))
    except BatchDirBusy as exc:
        log.warning("%s: /v1/files and /v1/batches are off", exc)
        state.extra["batch_error"] = str(exc)
        return
    state.batch = BatchWorker(state, store, config)
    state.batch.start()


async def stop_batches(state: ServerState) -> None:
    """Stop the job loop; lines still running are left without results, so the next start reruns them."""
    worker, state.batch = state.batch, None
    if worker is not None:
        await worker.stop()
        worker.store.close()
