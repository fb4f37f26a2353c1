"""check-triggers when the source misbehaves or the command line is wrong.

A small HTTP server plays a broken Prometheus / metrics page; the path prefix picks
the misbehaviour (prometheus-api-client appends /api/v1/query to the URL).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from tests.helpers.ports import free_port

runner = CliRunner()

BEHAVIOUR: dict[str, tuple[int, str, float]] = {
    "500": (500, "internal error", 0),
    "404": (404, "not found", 0),
    "400": (400, '{"status":"error","errorType":"bad_data","error":"parse error"}', 0),
    "garbage": (200, "this is not json", 0),
    "shape": (200, '{"status":"success","data":{"resultType":"vector","result":"oops"}}', 0),
    "values": (200, '{"status":"success","data":{"result":[{"metric":{},"value":[1,"x"]}]}}', 0),
    "slow": (200, '{"status":"success","data":{"result":[]}}', 5),
    "html": (200, "<html><body>hello</body></html>", 0),
}


@pytest.fixture(scope="module")
def bad_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            key = self.path.strip("/").split("/")[0]
            status, body, delay = BEHAVIOUR.get(key, (404, "no", 0))
            if delay:
                time.sleep(delay)
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # check-triggers sends its ~30 queries at once; the default backlog of 5 drops the
        # rest's SYNs, which the kernel retries only after a second.
        request_queue_size = 128

    server = Server(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["check-triggers", *args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_exit_3(code: int, stdout: str, stderr: str, text: str) -> None:
    assert code == 3, stderr
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert text in stderr


def test_unreachable_prometheus_is_one_line_and_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_exit_3(*run("--prometheus-url", url, "--json"),
                           f"cannot reach Prometheus at {url}")


@pytest.mark.parametrize(("path", "text"), [
    ("500", "answered HTTP 500"),
    ("404", "answered HTTP 404"),
    ("400", "answered HTTP 400"),
    ("garbage", "malformed JSON"),
    ("shape", "unexpected result shape"),
    ("values", "unexpected result shape"),
])
def test_bad_prometheus_answers_are_one_line_and_exit_3(bad_server: str, path: str,
                                                        text: str) -> None:
    assert_one_line_exit_3(*run("--prometheus-url", f"{bad_server}/{path}"), text)


def test_slow_prometheus_hits_the_single_timeout(bad_server: str) -> None:
    started = time.monotonic()
    code, stdout, stderr = run("--prometheus-url", f"{bad_server}/slow", "--timeout", "1")
    assert_one_line_exit_3(code, stdout, stderr, "did not answer within 1 s")
    # nine triggers, one deadline: not nine timeouts in a row
    assert time.monotonic() - started < 4


def test_unreachable_metrics_url_is_one_line_and_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_exit_3(*run("--metrics-url", url, "--sample", "0.1"),
                           f"cannot reach {url}/metrics")


@pytest.mark.parametrize(("path", "text"), [
    ("500", "answered HTTP 500"),
    ("html", "is not a Prometheus metrics page"),
])
def test_bad_metrics_page_is_one_line_and_exit_3(bad_server: str, path: str,
                                                 text: str) -> None:
    assert_one_line_exit_3(*run("--metrics-url", f"{bad_server}/{path}", "--sample", "0.1"),
                           text)


def test_watch_keeps_going_when_the_source_fails_and_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, stdout, _ = run("--prometheus-url", url, "--json", "--watch", "0.1", "--count", "2")
    assert code == 3
    docs = [json.loads(line) for line in stdout.splitlines()]
    assert len(docs) == 2 and all("cannot reach Prometheus" in d["error"] for d in docs)


@pytest.mark.parametrize(("args", "text"), [
    ((), "give exactly one of --prometheus-url"),
    (("--prometheus-url", "http://127.0.0.1:1", "--metrics-url", "http://127.0.0.1:2"),
     "give exactly one of"),
    (("--metrics-url", "http://127.0.0.1:1", "--instance", "a"),
     "--job and --node-job select Prometheus series"),
    (("--prometheus-url", "http://127.0.0.1:1", "--node-metrics-url", "http://127.0.0.1:2"),
     "--node-metrics-url is for direct mode"),
    (("--prometheus-url", "http://127.0.0.1:1", "--trigger", "disk"),
     "--trigger: unknown id 'disk'"),
    (("--metrics-url", "http://127.0.0.1:1", "--sample", "0"), "--sample: must be greater"),
    (("--prometheus-url", "http://127.0.0.1:1", "--timeout", "-1"), "--timeout: must be"),
    (("--prometheus-url", "http://127.0.0.1:1", "--watch", "0"), "--watch: must be"),
    (("--prometheus-url", "http://127.0.0.1:1", "--watch", "1", "--count", "0"),
     "--count: must be at least 1"),
    (("--metrics-url", "ftp://127.0.0.1/x"), "not an http(s) URL: 'ftp://127.0.0.1/x'"),
    (("--prometheus-url", "127.0.0.1:9091:x:"), "not an http(s) URL: '127.0.0.1:9091:x:'"),
])
def test_usage_errors_exit_64(args: tuple[str, ...], text: str) -> None:
    code, stdout, stderr = run(*args)
    assert (code, stdout) == (64, "")
    assert text in stderr
