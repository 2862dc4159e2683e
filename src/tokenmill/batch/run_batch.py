"""`tokenmill run-batch`: a batch file in, a results file out, the engine in this process (vLLM's run_batch).

Each input line is an OpenAI Batch API request line `{"custom_id", "method": "POST", "url", "body"}`; each
output line is OpenAI's batch output line `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`, the body being exactly what `tokenmill serve` answers to the same request (both go through
batch.execute.execute_line). Lines run concurrently (bounded) so the engine batches them, and results are
written in completion order.

Resumable: every result line is appended with flush + fsync, so a kill loses at most the line being
written; a rerun drops a truncated last line, skips every custom_id already in the output and appends
the rest, so each custom_id ends up in the output exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenmill.batch.validate import SUPPORTED_ENDPOINTS


class BatchInputError(ValueError):
    """A line of the input (or output) file that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class BatchLine:
    line_no: int  # 1-based, as editors count
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class BatchSummary:
    """What one run did; written as JSON by --summary-json and read by `tokenmill cost --batch-summary`."""

    model: str
    input_lines: int
    skipped: int = 0  # custom_ids already in the output file from an earlier run
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "completion_tokens_per_s": round(self.completion_tokens_per_s, 3),
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def parse_input(path: Path) -> list[BatchLine]:
    """Every request line, checked up front so a bad file fails before any work (BatchInputError). Unlike a
    /v1/batches job, lines may mix endpoints (as vLLM's run_batch allows)."""
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for no, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}:{no}"
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise BatchInputError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise BatchInputError(f"{where}: a line must be a JSON object with custom_id, method, url, body")
            cid, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
            if not isinstance(cid, str) or not cid:
                raise BatchInputError(f"{where}: custom_id must be a non-empty string, got {cid!r}")
            if cid in seen:
                raise BatchInputError(f"{where}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
            if method != "POST":
                raise BatchInputError(f"{where}: method must be 'POST', got {method!r}")
            if url not in SUPPORTED_ENDPOINTS:
                raise BatchInputError(f"{where}: url {url!r} is not supported; allowed: "
                                      f"{', '.join(SUPPORTED_ENDPOINTS)}")
            if not isinstance(body, dict):
                raise BatchInputError(f"{where}: body must be a JSON object (the request body), got "
                                      f"{type(body).__name__}")
            seen[cid] = no
            lines.append(BatchLine(no, cid, url, body))
    return lines


def recover_output(path: Path) -> set[str]:
    """custom_ids already answered in `path`, after cutting off a last line a kill left half written."""
    if not path.exists():
        return set()
    done: set[str] = set()
    good_end = 0  # byte offset just past the last complete, parseable line
    with open(path, "rb") as f:
        data = f.read()
    pos, no = 0, 0
    while pos < len(data):
        no += 1
        nl = data.find(b"\n", pos)
        if nl < 0:  # no newline: the write of this line was cut short
            break
        try:
            cid = json.loads(data[pos:nl])["custom_id"]
        except (ValueError, KeyError, TypeError):
            if data.find(b"\n", nl + 1) >= 0 or data[nl + 1:].strip():
                raise BatchInputError(f"{path}:{no}: not an output line; refusing to resume over it") from None
            break  # a torn last line that happens to end in a newline
        done.add(cid)
        pos = good_end = nl + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return done


class OutputWriter:
    """Appends one line per result, durable (fsync) before the next one is written. Thread-safe: lines are
    written from worker threads so an fsync never stalls the event loop that feeds the engine."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(text)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:  # after a write a cancelled worker left running in its thread
            self._f.close()


def output_record(line: BatchLine, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch output line; a request the server answered with an error keeps it in `response`."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


async def run_lines(state: Any, lines: Iterable[BatchLine], writer: OutputWriter, summary: BatchSummary,
                    max_concurrency: int, on_done: Any = None, priority: int = 0) -> None:
    """Run `lines` through execute_line, at most max_concurrency at once, writing each result as it ends."""
    from tokenmill.batch.execute import execute_line

    todo = iter(lines)

    async def worker() -> None:
        for line in todo:  # the shared iterator hands each line to exactly one worker
            status, body = await execute_line(state, line.url, line.body, priority=priority)
            await asyncio.to_thread(writer.write, output_record(line, status, body))
            usage = body.get("usage") if status == 200 else None
            if isinstance(usage, dict):
                summary.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                summary.completion_tokens += int(usage.get("completion_tokens") or 0)
            if status == 200:
                summary.succeeded += 1
            else:
                summary.failed += 1
            if on_done is not None:
                on_done()

    await asyncio.gather(*(worker() for _ in range(max(1, max_concurrency))))


async def build_state(engine_config: Any, chat_template: str | None = None) -> Any:
    """A ServerState with a running engine, as `tokenmill serve` builds it (engine core in a child process)."""
    from prometheus_client import CollectorRegistry

    from tokenmill.config import ServerConfig
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME
    from tokenmill.server.app import start_multiprocess_engine
    from tokenmill.server.metrics import ServerMetrics
    from tokenmill.server.state import ServerState

    names = [engine_config.model.served_model_name or engine_config.model.model or DEFAULT_MODEL_NAME]
    registry = CollectorRegistry()
    state = ServerState(engine_config=engine_config, server_config=ServerConfig(), served_model_names=names,
                        registry=registry, metrics=ServerMetrics(registry, names[0]), chat_template=chat_template,
                        created=int(time.time()))
    state.engine = await start_multiprocess_engine(engine_config)
    return state


async def run_batch(engine_config: Any, input_path: Path, output_path: Path, max_concurrency: int,
                    progress: bool = True, chat_template: str | None = None) -> BatchSummary:
    """The whole command: validate, recover the output, start the engine, run what is left."""
    lines = parse_input(input_path)
    done = recover_output(output_path)
    todo = [ln for ln in lines if ln.custom_id not in done]
    state = await build_state(engine_config, chat_template)
    summary = BatchSummary(model=state.model_name, input_lines=len(lines), skipped=len(lines) - len(todo))
    writer = OutputWriter(output_path)
    t0 = time.monotonic()
    try:
        with _progress(progress, len(lines), summary.skipped) as advance:
            await run_lines(state, todo, writer, summary, max_concurrency, advance)
    finally:
        summary.elapsed_s = time.monotonic() - t0
        writer.close()
        await state.engine.shutdown()
    return summary


class _progress:
    """A rich progress bar on stderr (or nothing); the context value is the per-line callback."""

    def __init__(self, enabled: bool, total: int, already: int) -> None:
        self.enabled, self.total, self.already = enabled, total, already
        self._bar: Any = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich import progress as rp
        from rich.console import Console

        self._bar = rp.Progress(rp.TextColumn("run-batch"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                rp.TimeRemainingColumn(), console=Console(stderr=True))
        self._bar.__enter__()
        task = self._bar.add_task("lines", total=self.total, completed=self.already)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def run_batch_command(
    model: Annotated[str | None, typer.Argument(
        help="HF folder, .gguf file or HF-cache name; omitted: the packaged default model (as `serve`).")] = None,
    input_file: Annotated[Path, typer.Option(
        "--input-file", "-i", help="Batch input JSONL (OpenAI Batch API request lines). A local path; vLLM "
                                   "also takes http(s) URLs, tokenmill does not.")] = ...,  # type: ignore[assignment]
    output_file: Annotated[Path, typer.Option(
        "--output-file", "-o", help="Results JSONL (OpenAI batch output lines), a local path. Appended to: "
                                    "rerun with the same file to resume after a kill.")] = ...,  # type: ignore[assignment]
    max_concurrency: Annotated[int | None, typer.Option(
        help="Lines in the engine at once (default: 2 x --max-num-seqs, so every step has a full batch).")] = None,
    summary_json: Annotated[Path | None, typer.Option(
        help="Also write the run's summary (token counts, seconds) here, for `tokenmill cost --batch-summary`.")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model name request bodies must carry in `model` (default: the MODEL argument).")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion in tokens.")] = None,
    kv_cache_memory: Annotated[float | None, typer.Option(help="KV cache size in GiB (as `serve`).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Most sequences decoded together in one step.")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(help="Token budget per engine step.")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    quantization: Annotated[str, typer.Option("--quantization", "-q", help="auto | none | q8_0 | q4_k.")] = "auto",
    task: Annotated[str, typer.Option(help="generate | embed (embed answers /v1/embeddings lines).")] = "generate",
    num_threads: Annotated[int | None, typer.Option(help="Engine compute threads.")] = None,
    cpu_cores: Annotated[str | None, typer.Option(help="Pin the engine to these cores, e.g. 0-3.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
) -> None:
    """Run a batch file through the engine in this process (no server) and write OpenAI batch output lines."""
    import logging

    from tokenmill.engine.args import engine_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    try:
        parse_input(input_file)  # exit 2 naming the line before a model loads
        recover_output(output_file)
        if model is not None:
            from tokenmill.model.discovery import check_model

            check_model(model)
        config = engine_config(model, served_model_name=served_model_name, max_model_len=max_model_len,
                               kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens, dtype=dtype, quantization=quantization,
                               task=task, num_threads=num_threads, cpu_cores=cpu_cores)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    concurrency = max_concurrency or 2 * config.scheduler.max_num_seqs
    summary = asyncio.run(run_batch(config, input_file, output_file, concurrency, progress))
    text = json.dumps(summary.to_json())
    if summary_json is not None:
        summary_json.write_text(text + "\n")
    typer.echo(text, err=True)
    raise typer.Exit(1 if summary.failed else 0)
