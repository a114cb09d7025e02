"""`mnistq`: one command, a subcommand per job. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Callable

from mnistq.errors import MnistqError
from mnistq.protocol import EXIT_CODES_HELP, ExitCode
from mnistq.settings import Settings

log = logging.getLogger("mnistq")


def _train(argv: list[str]) -> int:
    from trainer.train import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from trainer.evaluate import main

    return main(argv)


def _predict(argv: list[str]) -> int:
    from app.predict import main

    return main(argv)


def _worker(argv: list[str]) -> int:
    from worker.cli import main

    return main(argv)


def _status(argv: list[str]) -> int:
    from worker.cli import status_main

    return status_main(argv)


def _run(argv: list[str]) -> int:
    from app.run import run_main

    return run_main(argv)


def _report(argv: list[str]) -> int:
    from report.report import main

    return main(argv)


def _producer(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from app import watch as cli

        return int(getattr(cli, f"{name}_main")(argv))

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "run": (_run, "the main job: embedded Redis + workers + inbox watcher"),
    "watch": (_producer("watch"), "watch an inbox and write results to CSV (needs REDIS_URL)"),
    "classify": (_producer("classify"), "classify image paths through the queue"),
    "worker": (_worker, "start a Celery worker (needs REDIS_URL)"),
    "status": (_status, "queue depth, live workers and their model versions"),
    "train": (_train, "train the CNN on MNIST and write model_state.pt"),
    "evaluate": (_evaluate, "test accuracy of a model file"),
    "predict": (_predict, "classify images in this process, no queue"),
    "report": (_report, "one HTML page of a results CSV: digits, confidence, throughput, errors"),
}


def usage() -> str:
    lines = ["usage: mnistq COMMAND [options]   (mnistq COMMAND --help for each)", ""]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join([*lines, "", textwrap.fill(EXIT_CODES_HELP, 100)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mnistq: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    try:
        settings = Settings.from_env()
    except MnistqError as e:  # a bad variable: one line, before anything starts
        print(f"mnistq {name}: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[name][0](rest)
    except MnistqError as e:  # expected failures: one clear line, no traceback
        print(f"mnistq {name}: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except Exception as e:  # a bug or an unforeseen failure: one line; the traceback on request
        log.debug("mnistq %s failed", name, exc_info=True)
        hint = "" if log.isEnabledFor(logging.DEBUG) else " (run with MNISTQ_LOG_LEVEL=DEBUG for details)"
        text = next(iter(str(e).strip().splitlines()), "")  # one line, whatever the exception says
        print(f"mnistq {name}: unexpected error: {type(e).__name__}: {text}{hint}", file=sys.stderr)
        return int(ExitCode.UNEXPECTED)


if __name__ == "__main__":
    sys.exit(main())
