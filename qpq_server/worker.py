"""One worker process of a multi-worker `qpq-server run` (started by the supervisor).

    python -m qpq_server.worker --config PATH --index I --count N --pipe-fd FD
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qpq_server import eventloop
from qpq_server.errors import QpqError
from qpq_server.workers import WorkerContext

__all__ = ["main"]


class _WorkerField(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self._index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._index
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpq-server worker",
                                     description="one worker of `qpq-server run`")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pipe-fd", type=int, required=True)
    args = parser.parse_args(argv)
    from qpq_server.app import ServerApp
    from qpq_server.logs import setup_logging

    setup_logging(os.environ.get("QPQ_LOG_LEVEL", "info"))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(args.index))
    os.umask(0o077)
    context = WorkerContext(args.index, args.count, args.pipe_fd)
    try:
        app = ServerApp(args.config, worker=context)
        eventloop.run(app.run())
    except QpqError as exc:
        print(f"qpq-server: worker {args.index}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
