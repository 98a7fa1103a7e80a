"""Needle in a haystack as on the card: locally with transformers, and through a real OpenAI-compatible
HTTP server (started here, on loopback) serving the tiny exported model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alia_nemo.cli import main
from alia_nemo.eval import niah


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tok):
    from alia_nemo.model.export import export
    from tests.helpers import save_peaked_tiny_model

    run = tmp_path_factory.mktemp("run")
    save_peaked_tiny_model(run / "final")
    tok.save_pretrained(str(run / "final"))
    return export(run, tmp_path_factory.mktemp("export") / "hf")


# The card's texts, as the card prints them: what the model must receive, checked in the messages it is sent.
CARD_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
CARD_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
CARD_QUESTION = "What is the best thing to do in San Francisco?"


def test_the_model_receives_the_cards_needle_system_prompt_and_question(tok):
    ctx = niah.build_context(tok, niah.default_haystack(), 400, 50)
    msgs = niah.messages(ctx)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == CARD_SYSTEM
    assert msgs[1]["content"].endswith("\n\n" + CARD_QUESTION)
    assert msgs[1]["content"].count(CARD_NEEDLE) == 1
    assert niah.keyphrase_score("Eat a sandwich in Dolores Park on a sunny day!") == 1.0
    assert niah.keyphrase_score("A sandwich.") == pytest.approx(1 / 3) and niah.keyphrase_score("No idea") == 0.0


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_context_has_the_needle_once_at_its_depth_and_the_length(tok, depth):
    hay = niah.default_haystack()
    ctx = niah.build_context(tok, hay, 600, depth)
    assert ctx.count(niah.NEEDLE) == 1
    pos = ctx.index(niah.NEEDLE) / max(1, len(ctx) - len(niah.NEEDLE))
    assert abs(pos - depth / 100) < 0.1
    n = niah.prompt_tokens(tok, niah.messages(ctx))
    assert 560 <= n <= 610  # the whole prompt is sized to the target length


def test_niah_locally_writes_results_and_heat_map(tiny_export, tmp_path):
    assert main(["eval", "niah", "--model", str(tiny_export), "--out", str(tmp_path), "--lengths", "256,512",
                 "--depths", "0,50,100"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "niah.json").read_text())
    assert (res["needle"], res["system_prompt"], res["question"]) == (niah.NEEDLE, niah.SYSTEM_PROMPT, niah.QUESTION)
    assert [(t["length"], t["depth"]) for t in res["trials"]] == [
        (a, b) for a in (256, 512) for b in (0.0, 50.0, 100.0)
    ]
    assert all(250 <= t["prompt_tokens"] <= 256 or 500 <= t["prompt_tokens"] <= 512 for t in res["trials"])
    assert (tmp_path / "niah.png").stat().st_size > 1000


@pytest.fixture
def openai_server(tiny_export):
    """A small real OpenAI-compatible server on loopback: the tiny export answers chats; judge prompts get a
    fixed verdict (a Prometheus-2 judge can not exist here)."""
    backend = niah.TransformersBackend(str(tiny_export))
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, **body})
            if "###Score Rubrics" in body["messages"][-1]["content"]:
                content = "Feedback: it names the sandwich and the park. [RESULT] 4"
            else:
                content = backend.chat(body["messages"], body.get("temperature", 0.0))
            out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()


def test_niah_against_an_openai_compatible_endpoint_with_a_judge(openai_server, tiny_export, tmp_path):
    url, requests = openai_server
    rc = main(["eval", "niah", "--endpoint", url, "--served-model", "alia-tiny", "--tokenizer", str(tiny_export),
               "--out", str(tmp_path), "--lengths", "300", "--depths", "50", "--judge-endpoint", url])  # fmt: skip
    assert rc == 0
    chat, judge = requests
    assert chat["path"] == "/v1/chat/completions" and chat["model"] == "alia-tiny" and chat["temperature"] <= 0.2
    system, user = chat["messages"]
    assert system == {"role": "system", "content": niah.SYSTEM_PROMPT}
    assert user["role"] == "user" and user["content"].endswith("\n\n" + niah.QUESTION)
    assert user["content"].count(niah.NEEDLE) == 1
    assert "###Response to evaluate:" in judge["messages"][0]["content"]
    trial = json.loads((tmp_path / "niah.json").read_text())["trials"][0]
    assert trial["judge"] == 4 and trial["length"] == 300 and trial["depth"] == 50.0
