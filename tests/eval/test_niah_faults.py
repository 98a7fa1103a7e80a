"""`eval niah` against a faulty OpenAI-compatible endpoint (a real HTTP server on loopback): every fault is one
clear error (exit 2) naming the endpoint, the trial and what was wrong; transient faults are retried with
backoff; finished trials stay on disk and a rerun with the same settings asks only for the rest."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alia_nemo.cli import main
from alia_nemo.eval import niah

LENGTHS, DEPTHS = "200,300", "0,100"  # four small trials
CELLS = [(200, 0.0), (200, 100.0), (300, 0.0), (300, 100.0)]
ANSWER = "Eat a sandwich and sit in Dolores Park on a sunny day."


def ok(content: str | None = ANSWER) -> tuple[int, bytes, dict]:
    """A well-formed chat completion."""
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return 200, json.dumps(reply).encode(), {}


class FakeEndpoint:
    """An HTTP server whose reply to the n-th request (0-based) is ``script(n)``: (status, body, headers)."""

    def __init__(self, script: Callable[[int], tuple[int, bytes, dict]]):
        self.script = script
        self.requests: list[dict] = []
        lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(endpoint.requests)
                    endpoint.requests.append(body)
                status, payload, headers = endpoint.script(n)
                if status == 0:  # "hang": answer after the client's timeout
                    time.sleep(1.5)
                    status, payload, headers = ok()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    servers: list[FakeEndpoint] = []

    def start(script: Callable[[int], tuple[int, bytes, dict]]) -> FakeEndpoint:
        servers.append(FakeEndpoint(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(niah, "BACKOFF_S", 0.01)


def _eval(url: str, out, tok_dir: str, *extra: str) -> int:
    return main(["eval", "niah", "--endpoint", url, "--served-model", "alia-test", "--tokenizer", tok_dir,
                 "--out", str(out), "--lengths", LENGTHS, "--depths", DEPTHS, *extra])  # fmt: skip


def _stored(out) -> list[tuple[int, float]]:
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert "settings" in json.loads(lines[0])
    return [(json.loads(x)["length"], json.loads(x)["depth"]) for x in lines[1:]]


def _error(capsys) -> str:
    """The CLI's error: exactly one line of stderr starts with it (retry notices are separate lines)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in lines if x.startswith("alia-nemo eval:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_retried_then_one_clear_error(tmp_path, tok_dir, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert _eval(url, tmp_path, tok_dir, "--retries", "2") == 2
    err = _error(capsys)
    assert err.startswith(f"alia-nemo eval: error: endpoint {url}/chat/completions (trial length 200 tokens, depth 0%)")
    assert "connection refused, after 3 attempt(s) (--retries 2)" in err and "0 finished trial(s) are kept" in err
    assert _stored(tmp_path) == []


def test_http_500_then_200_is_retried_with_backoff_and_succeeds(tmp_path, tok_dir, endpoint, capsys):
    server = endpoint(lambda n: (500, b'{"error": "busy"}', {}) if n < 2 else ok())
    assert _eval(server.url, tmp_path, tok_dir) == 0
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "retry 1 of 3 in 0.01 s" in err and "retry 2 of 3 in 0.02 s" in err  # doubling
    assert len(server.requests) == len(CELLS) + 2
    assert [(t["length"], t["depth"]) for t in json.loads((tmp_path / "niah.json").read_text())["trials"]] == CELLS
    assert _stored(tmp_path) == CELLS


def test_503_forever_gives_up_keeping_the_finished_trials(tmp_path, tok_dir, endpoint, capsys):
    server = endpoint(lambda n: ok() if n < 2 else (503, b"overloaded", {"Retry-After": "0"}))
    assert _eval(server.url, tmp_path, tok_dir) == 2
    err = _error(capsys)
    assert "(trial length 300 tokens, depth 0%)" in err and "HTTP 503 Service Unavailable (overloaded)" in err
    assert "after 4 attempt(s) (--retries 3)" in err and "2 finished trial(s) are kept in" in err
    assert len(server.requests) == 2 + 4
    assert _stored(tmp_path) == CELLS[:2] and not (tmp_path / "niah.json").exists()


def test_429_is_retried_but_other_4xx_are_not(tmp_path, tok_dir, endpoint, capsys):
    server = endpoint(lambda n: (429, b"slow down", {}) if n == 0 else ok())
    assert _eval(server.url, tmp_path / "a", tok_dir) == 0 and len(server.requests) == len(CELLS) + 1
    server = endpoint(lambda n: (404, b'{"error": {"message": "The model alia-test does not exist"}}', {}))
    assert _eval(server.url, tmp_path / "b", tok_dir) == 2
    err = _error(capsys)
    assert "HTTP 404 Not Found" in err and "does not exist" in err and "served model name 'alia-test'" in err
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ((200, b"<html>Bad Gateway</html>", {}), "the reply is not JSON (it starts '<html>Bad Gateway</html>')"),
        (ok(None), "the reply's choices[0].message.content is missing or null, not text"),
        ((200, b"{}", {}), "the reply has no choices (keys [])"),
        ((200, b'{"error": {"message": "context too long"}}', {}), "it says: context too long"),
        ((200, b'{"choices": []}', {}), "the reply has no choices"),
    ],
    ids=["garbage", "null-content", "empty-object", "error-object", "empty-choices"],
)
def test_malformed_replies_fail_at_once_naming_what_was_wrong(tmp_path, tok_dir, endpoint, capsys, reply, message):
    server = endpoint(lambda n: ok() if n == 0 else reply)
    assert _eval(server.url, tmp_path, tok_dir) == 2
    err = _error(capsys)
    assert err.startswith(f"alia-nemo eval: error: endpoint {server.url}/chat/completions (trial length 200 tokens, "
                          "depth 100%)")  # fmt: skip
    assert message in err and "1 finished trial(s) are kept" in err
    assert len(server.requests) == 2  # not retried: asking again gets the same reply
    assert _stored(tmp_path) == CELLS[:1]


def test_timeout_option_bounds_each_request(tmp_path, tok_dir, endpoint, capsys):
    server = endpoint(lambda n: (0, b"", {}))  # answers only after 1.5 s
    t0 = time.monotonic()
    assert _eval(server.url, tmp_path, tok_dir, "--timeout", "0.3", "--retries", "1") == 2
    assert time.monotonic() - t0 < 5
    err = _error(capsys)
    assert "no reply within 0.3 s, after 2 attempt(s) (--retries 1); raise --timeout" in err
    assert len(server.requests) == 2


def test_a_failing_judge_is_named(tmp_path, tok_dir, endpoint, capsys):
    chat = endpoint(lambda n: ok())
    judge = endpoint(lambda n: (200, b"not json", {}))
    assert _eval(chat.url, tmp_path, tok_dir, "--judge-endpoint", judge.url) == 2
    assert f"endpoint {judge.url}/chat/completions (trial length 200 tokens, depth 0%)" in _error(capsys)


def test_rerun_continues_with_only_the_remaining_trials(tmp_path, tok_dir, tok, endpoint, capsys):
    first = endpoint(lambda n: ok() if n < 3 else (500, b"down", {}))
    assert _eval(first.url, tmp_path, tok_dir, "--retries", "0") == 2
    assert _stored(tmp_path) == CELLS[:3]
    before = (tmp_path / "trials.jsonl").read_text()
    # A run killed while writing leaves half a line: it is dropped, and that trial is asked again.
    with (tmp_path / "trials.jsonl").open("a") as f:
        f.write('{"length": 300, "depth": 100.0, "prompt_to')
    capsys.readouterr()

    second = endpoint(lambda n: ok())
    assert _eval(second.url, tmp_path, tok_dir) == 0
    assert "3 of 4 trials already done" in capsys.readouterr().out
    assert len(second.requests) == 1  # only the remaining cell
    expected = niah.messages(niah.build_context(tok, niah.default_haystack(), 300, 100.0))
    assert second.requests[0]["messages"] == expected
    assert (tmp_path / "trials.jsonl").read_text().startswith(before) and _stored(tmp_path) == CELLS
    assert [(t["length"], t["depth"]) for t in json.loads((tmp_path / "niah.json").read_text())["trials"]] == CELLS

    # Everything done: a rerun asks nothing and rewrites the same results.
    assert _eval(second.url, tmp_path, tok_dir) == 0 and len(second.requests) == 1


@pytest.mark.parametrize(
    ("extra", "changed"),
    [(["--temperature", "0.1"], "temperature: 0.0 -> 0.1"), (["--max-new-tokens", "32"], "max_new_tokens: 64 -> 32")],
)
def test_rerun_with_other_settings_is_refused_not_mixed(tmp_path, tok_dir, endpoint, capsys, extra, changed):
    server = endpoint(lambda n: ok() if n < 1 else (500, b"down", {}))
    assert _eval(server.url, tmp_path, tok_dir, "--retries", "0") == 2
    kept = (tmp_path / "trials.jsonl").read_text()
    capsys.readouterr()
    assert _eval(server.url, tmp_path, tok_dir, *extra) == 2
    err = _error(capsys)
    assert "trials.jsonl holds 1 trial(s) of another setup" in err and changed in err and "another --out" in err
    assert len(server.requests) == 2 and (tmp_path / "trials.jsonl").read_text() == kept
    # Another grid, another served model: refused too.
    assert main(["eval", "niah", "--endpoint", server.url, "--served-model", "other", "--tokenizer", tok_dir,
                 "--out", str(tmp_path), "--lengths", "200", "--depths", DEPTHS]) == 2  # fmt: skip
    err = _error(capsys)
    assert "model: 'alia-test' -> 'other'" in err and "lengths: [200, 300] -> [200]" in err


def test_bad_options_are_usage_errors_not_bugs(tmp_path, tok_dir, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    for extra, message in [
        (["--lengths", "4k"], "give comma-separated numbers"),
        (["--depths", "150"], "percentages from 0 to 100"),
        (["--timeout", "0"], "need > 0 seconds"),
        (["--retries", "-1"], ">= 0 retries"),
    ]:
        assert main(["eval", "niah", "--endpoint", url, "--served-model", "m", "--tokenizer", tok_dir,
                     "--out", str(tmp_path), "--lengths", LENGTHS, "--depths", DEPTHS, *extra]) == 2  # fmt: skip
        assert message in _error(capsys)
    assert main(["eval", "niah", "--endpoint", "localhost:8000/v1", "--served-model", "m", "--tokenizer", tok_dir,
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "give an http(s) base URL" in _error(capsys)
