"""The Celery app, the worker's start-up signals and the one task.

Importing this module reads no settings and loads no model. The app is configured when Celery
first needs its configuration (``on_configure``, from ``Settings.from_env()``); the runtime
(model, batcher, throughput stats, see worker/runtime.py) is built when the worker starts: in
``worker_init`` for the threads pool (the default), in ``worker_process_init`` for the prefork
pool, after the fork, so no oneDNN thread pool or CUDA context crosses it (the prefork parent
only reads the checkpoint once, on the CPU, to fail the start early).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Any, NoReturn

from celery import Celery, Task, signals
from celery.exceptions import CPendingDeprecationWarning
from celery.worker.control import inspect_command

from mnistq.celeryconf import config
from mnistq.errors import MnistqError
from mnistq.protocol import QUEUE, REPLY_PREFIX, TASK_NAME, ClassifyRequest, ExitCode, Reply, is_reply_key
from mnistq.settings import Settings
from worker import outage, redis_transport
from worker.broker import quiet_celery_reconnect_logs
from worker.reply import push_reply
from worker.runtime import Runtime, classify_paths, internal_failure

log = logging.getLogger("mnistq.worker")
redis_transport.install()  # before the app opens any broker connection (see its docstring)
app = Celery("mnistq")

#: This process's runtime, built once at start (see the signals below); None until then.
_runtime: Runtime | None = None


def _fail_start(message: str, code: ExitCode) -> NoReturn:
    if log.hasHandlers():  # else logging's last resort would print the same line twice
        log.critical("cannot start: %s", message)
    sys.stderr.write(f"mnistq worker: cannot start: {message}\n")
    sys.stderr.flush()
    # Exit the whole process at once: Celery would log and swallow an exception raised in a
    # signal handler, and a worker without its settings or model must not take tasks.
    os._exit(code)


@functools.cache
def settings() -> Settings:
    """This process's settings, read once: the app's configuration and the runtime share them."""
    try:
        return Settings.from_env()
    except MnistqError as e:
        _fail_start(str(e), e.exit_code)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    # Our consumer waits for the broker quietly (worker/broker.py).
    sender.config_from_object({**config(settings()), "worker_consumer": "worker.broker:Consumer"})


def queue_depth() -> int | None:
    try:
        with app.connection_for_read() as conn:
            return int(conn.default_channel.client.llen(QUEUE))
    except Exception:  # depth is informational; a broker without LLEN just reports nothing
        return None


def _load(rt: Runtime) -> Runtime:
    try:
        return rt.load()
    except MnistqError as e:
        _fail_start(str(e), ExitCode.MODEL)
    except Exception as e:  # CUDA out of memory, a failed warm-up: Celery would swallow these
        _fail_start(f"loading the model failed: {type(e).__name__}: {e}", ExitCode.MODEL)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _runtime
    s = settings()
    try:
        s.require_redis()
    except MnistqError as e:
        _fail_start(str(e), ExitCode.CONFIG)
    outage.configure(str(app.conf.broker_url), s.redis_url)
    quiet_celery_reconnect_logs()
    # The command line's --pool/--concurrency override the config; the sender knows the result.
    pool = str(getattr(sender, "pool_cls", app.conf.worker_pool))
    processes = int(getattr(sender, "concurrency", None) or 1)
    if "prefork" in pool:
        # Check the checkpoint once here, so a bad file fails the start, not every child.
        import torch

        from model import load_checkpoint

        # One thread: loading runs torch ops, and an OpenMP pool started here would be inherited
        # by every child in a state that hangs a child running 2+ threads at its first use.
        torch.set_num_threads(1)
        try:
            version = load_checkpoint(s.model).version
        except MnistqError as e:
            _fail_start(str(e), ExitCode.MODEL)
        _runtime = Runtime(s, processes=processes, start_version=version, queue_depth=queue_depth)
        return
    _runtime = _load(Runtime(s, processes=1, queue_depth=queue_depth))
    _runtime.heap.tune(_runtime.settings.forward_batch)


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    # Said on every lost connection, about a Celery 6 default that does not concern us: with
    # acks_late, what a worker held when its broker went away is delivered again anyway. Set
    # here, after Celery's logging setup turned its deprecation warnings on ("always").
    warnings.filterwarnings(
        "ignore", r"\s*In Celery 5\.1 we introduced an optional breaking", CPendingDeprecationWarning
    )
    # The model was loaded before Celery set up logging (worker_init), so its line went nowhere.
    if _runtime is not None and (serving := _runtime.serving()):
        log.info("%s", serving)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    global _runtime
    parent = _runtime  # inherited through the fork
    processes = parent.processes if parent is not None else 1
    _runtime = _load(Runtime(settings(), processes=processes, queue_depth=queue_depth))
    _runtime.heap.tune(_runtime.settings.forward_batch)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _runtime is not None:
        _runtime.close()


@inspect_command()
def mnistq_model(state: Any) -> dict[str, Any]:
    """`mnistq status`: the model this worker serves."""
    rt = _runtime
    if rt is None:
        return {"version": None, "device": None, "precision": None}
    return rt.model_info()


def _clip(value: object) -> str:
    """A received value for a log line: repr'd (no line breaks), at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@app.task(name=TASK_NAME, bind=True, ignore_result=True)
def classify(self: Task, *args: Any, **kwargs: Any) -> None:
    """Classify a ClassifyRequest's paths; the Reply goes onto its ``reply_to`` list.

    Returns nothing, so Celery stores and logs no result. A malformed request, or a reply_to
    that is not a reply key (which could name any key in Redis), is refused with one warning.
    """
    task_id = self.request.id
    rt = _runtime
    if rt is None or rt.batcher is None:
        raise MnistqError("model not loaded in this process")
    if args:
        log.warning("task %s refused: positional arguments (keyword arguments only)", task_id)
        return
    try:
        request = ClassifyRequest.from_kwargs(kwargs)
    except ValueError as e:
        log.warning("task %s refused: %s", task_id, e)
        reply_to = kwargs.get("reply_to")
        if isinstance(reply_to, str) and is_reply_key(reply_to):
            # An answer of no results, saying why: the sender gives each of its files an error
            # result (mnistq/protocol.py miscounted) rather than sending the message again forever.
            reply = Reply(task_id, [], refused=str(e))
            push_reply(app.backend.client, reply_to, reply.dumps(), rt.settings.result_expires)
        return
    reply_to = request.reply_to
    if reply_to is not None and not is_reply_key(reply_to):
        log.warning(
            "task %s refused: reply_to %s is not a reply key (%s + 32 hex digits)",
            task_id,
            _clip(reply_to),
            REPLY_PREFIX,
        )
        return
    hostname = self.request.hostname
    try:
        results = classify_paths(rt.settings, rt.batcher, request, hostname)
    except Exception as e:  # the loop's edge: every path still gets its (error) result
        log.exception("classifying %d paths failed", len(request.paths))
        results = internal_failure(request, e, hostname)
    rt.heap.trim()  # what big decodes left, if any
    if reply_to is not None:
        # A list per client: the producer pops whole task results as they finish, no polling.
        push_reply(app.backend.client, reply_to, Reply(task_id, results).dumps(), rt.settings.result_expires)
