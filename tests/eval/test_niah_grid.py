"""`eval niah` sizes its default grid to the model's context, says what it will run and for about how long before
the first trial, shows progress, and marks (in niah.json and niah.png) any cell longer than the model can read.

The tiny models here are built in code with a chosen ``max_position_embeddings``; they answer nonsense, which is
fine: these tests are about the grid, the messages and the files, not about retrieval."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alia_nemo.cli import main
from alia_nemo.eval import niah

CARD_LENGTHS = [4096, 16384, 32768, 65536, 131072, 163840]
CARD_DEPTHS = [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0]


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model is all overhead: on a busy 2-core machine one torch thread runs it ~10x faster than two
    threads spinning against each other (and the other tests' processes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tok):
    """``tiny_model(context)``: a directory like an export (config.json, weights, tokenizer) of alia_tiny whose
    config declares a ``context``-token context."""
    from transformers import LlamaForCausalLM

    from alia_nemo.model.architectures import get_spec

    made: dict[int, str] = {}

    def make(context: int) -> str:
        if context not in made:
            import torch

            torch.manual_seed(0)
            config = get_spec("alia_tiny").hf_config()
            config.max_position_embeddings = context
            path = tmp_path_factory.mktemp(f"tiny{context}")
            LlamaForCausalLM(config).save_pretrained(path)
            tok.save_pretrained(str(path))
            made[context] = str(path)
        return made[context]

    return make


@pytest.mark.parametrize(
    ("context", "lengths"),
    [
        (None, CARD_LENGTHS),  # unknown: the card's grid
        (200_000, [*CARD_LENGTHS, 200_000]),
        (163_840, CARD_LENGTHS),
        (131_072, CARD_LENGTHS[:5]),
        (32_768, [4096, 16384, 32768]),
        (16_384, [4096, 8192, 16384]),  # two of the card's fit: a quarter and a half are added
        (8192, [2048, 4096, 8192]),
        (4096, [1024, 2048, 4096]),
        (1024, [256, 512, 1024]),
    ],
)
def test_default_lengths_follow_the_documented_rule(context, lengths):
    assert niah.default_lengths(context) == lengths
    assert list(niah.CARD_DEPTHS) == CARD_DEPTHS


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(("context", "lengths"), [(1024, [256, 512, 1024]), (4096, [1024, 2048, 4096])])
def test_default_grid_of_a_tiny_export_fits_its_context_and_runs_quickly(tiny_model, tmp_path, capsys, context,
                                                                         lengths):  # fmt: skip
    model = tiny_model(context)
    assert niah.find_context(model) == niah.Context(context, f"max_position_embeddings in {model}/config.json")
    assert main(["eval", "niah", "--model", model, "--out", str(tmp_path), "--max-new-tokens", "2"]) == 0
    out = _lines(capsys.readouterr().out)

    # Before the first trial: the context and where it came from, the grid, and an estimate saying it is one.
    first = next(i for i, line in enumerate(out) if line.startswith("[alia-nemo] niah ["))
    before = "\n".join(out[:first])
    assert f"the model's context is {context:,} tokens (max_position_embeddings in {model}/config.json)" in before
    assert f"grid of 3 length(s) x 7 depth(s) = 21 trials (the default for a {context:,}-token context" in before
    assert f"lengths (prompt tokens): {', '.join(f'{n:,}' for n in lengths)}\n" in before + "\n"
    assert "depths (% into the haystack): 0, 10, 25, 50, 75, 90, 100" in before
    assert "niah: estimated time " in before and "An estimate: 2 timed chat(s) after a warm-up" in before
    assert "beyond context" not in "\n".join(out)

    # One progress line per trial, counting up to the grid's size, each with the time left.
    progress = [line for line in out if line.startswith("[alia-nemo] niah [")]
    assert len(progress) == 21
    assert progress[0].startswith("[alia-nemo] niah [ 1/21, ") and " left] " in progress[0]
    assert progress[-1].startswith("[alia-nemo] niah [21/21, done] ")

    res = json.loads((tmp_path / "niah.json").read_text())
    assert [(t["length"], t["depth"]) for t in res["trials"]] == [(n, d) for n in lengths for d in CARD_DEPTHS]
    assert res["context"] == context and res["lengths_beyond_context"] == []
    assert [t["beyond_context"] for t in res["trials"]] == [False] * 21
    assert max(t["prompt_tokens"] for t in res["trials"]) <= context


class _Figures:
    """Keeps every figure saved while it is active, to read the heat map's drawing back."""

    def __init__(self, monkeypatch):
        from matplotlib.figure import Figure

        self.saved: list = []
        save = Figure.savefig

        def keep(fig, *args, **kwargs):
            self.saved.append(fig)
            return save(fig, *args, **kwargs)

        monkeypatch.setattr(Figure, "savefig", keep)


def test_explicit_longer_lengths_warn_and_are_marked_beyond_context(tiny_model, tmp_path, capsys, monkeypatch):
    model = tiny_model(1024)
    figures = _Figures(monkeypatch)
    assert main(["eval", "niah", "--model", model, "--out", str(tmp_path), "--lengths", "512,2048",
                 "--depths", "0,100", "--max-new-tokens", "2"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert (f"[alia-nemo] warning: --lengths beyond the model's context of 1,024 tokens "
            f"(max_position_embeddings in {model}/config.json): 2,048; ") in captured.err  # fmt: skip
    out = captured.out
    assert "(--lengths as given)" in out and "lengths (prompt tokens): 512, 2,048 (beyond context)" in out
    assert out.index("lengths (prompt tokens)") < out.index("niah: estimated time") < out.index("niah [1/4")
    assert [line.endswith("(beyond context)") for line in out.splitlines() if "niah [" in line] == [0, 0, 1, 1]

    res = json.loads((tmp_path / "niah.json").read_text())
    assert res["context"] == 1024 and res["context_source"] == f"max_position_embeddings in {model}/config.json"
    assert res["lengths_beyond_context"] == [2048]
    assert [(t["length"], t["beyond_context"]) for t in res["trials"]] == [(512, False)] * 2 + [(2048, True)] * 2

    # The picture: the 2,048 column is hatched and labelled, the 512 column is not.
    (fig,) = figures.saved
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [(p.get_x(), p.get_width(), p.get_height(), p.get_hatch()) for p in hatched] == [(0.5, 1, 2, "//")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["512", "2,048\nbeyond context"]
    assert "beyond the model's 1,024-token context" in ax.get_title()
    lengths, depths, grid, past = niah.heat_map([niah.Trial(**{k: v for k, v in t.items() if k != "beyond_context"})
                                                 for t in res["trials"]], 1024)  # fmt: skip
    assert (lengths, depths, grid.shape, past) == ([512, 2048], [0.0, 100.0], (2, 2), [False, True])


def test_results_of_an_unknown_context_mark_nothing():
    trials = [niah.Trial(300, 50.0, 300, "", 0.0)]
    assert niah.heat_map(trials, None)[3] == [False] and niah.beyond([300, 9_999_999], None) == []


def test_the_estimate_is_a_line_through_the_timings():
    est = niah.Estimate.fit([(100, 1.0), (1100, 2.0)])
    assert est.fixed_s == pytest.approx(0.9) and est.per_token_s == pytest.approx(0.001)
    assert est.total([100, 1100, 10_100]) == pytest.approx(1.0 + 2.0 + 11.0)
    assert niah.Estimate.fit([(500, 2.0)]) == niah.Estimate(0.0, 0.004)  # one size: proportional to tokens
    assert niah.Estimate.fit([(100, 2.0), (1000, 1.0)]) == niah.Estimate(1.5, 0.0)  # noise: flat at the mean
    assert niah.Estimate.fit([]) is None
    line = niah.estimate_line([100, 1100, 10_100], [(100, 1.0), (1100, 2.0)])
    assert line.startswith("niah: estimated time ~14 s for 3 trial(s), the longest ~11 s each. An estimate: ")
    assert "(100 tokens: 1 s, 1,100 tokens: 2 s)" in line
    assert "from the first trial on" in niah.estimate_line([100], [])  # an endpoint: no probe requests
    assert [niah.duration(s) for s in (0.2, 42, 185, 7620)] == ["under 1 s", "42 s", "3 min 05 s", "2 h 07 min"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    trials = [niah.Trial(n, 50.0, n, "a sandwich", 1 / 3) for n in (100, 200, 400)]
    term, out = _Terminal(), io.StringIO()
    bar = niah.GridProgress([100, 200, 400], 3, [(100, 0.5), (400, 2.0)], context=300, stream=term, out=out)
    for t in trials:
        bar(t)
    bar.close()
    drawn = term.getvalue()
    assert "\r" in drawn and "niah" in drawn and "3/3 trials" in drawn and "done" in drawn
    assert [line.split("depth")[0].split()[-2] for line in out.getvalue().splitlines()] == ["100", "200", "400"]
    assert out.getvalue().splitlines()[-1].endswith("(beyond context)")

    log, out = io.StringIO(), io.StringIO()  # not a terminal (a log file, CI): no bar, no carriage returns
    lines = niah.GridProgress([200, 400], 3, [(100, 0.5), (400, 2.0)], stream=log, out=out)
    lines(trials[1])
    lines(trials[2])
    lines.close()
    assert log.getvalue() == "" and "\r" not in out.getvalue()
    first, last = out.getvalue().splitlines()
    assert first.startswith("[alia-nemo] niah [2/3, ") and " left]     200 tokens depth    50%: score 0.33" in first
    assert last.startswith("[alia-nemo] niah [3/3, done]     400 tokens")


@pytest.fixture
def models_endpoint():
    """An OpenAI-compatible server on loopback whose ``GET /v1/models`` lists ``served`` (vLLM's shape); chats get
    a fixed answer. ``start(served)`` returns its /v1 base URL and the chat bodies it received."""
    servers: list[ThreadingHTTPServer] = []

    def start(served: list[dict]) -> tuple[str, list[dict]]:
        chats: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def _send(self, payload: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(payload).encode())

            def do_GET(self):
                self._send({"object": "list", "data": served})

            def do_POST(self):
                chats.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": "a sandwich"}}]})

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", chats

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_endpoint_context_comes_from_the_server_then_the_tokenizers_config(models_endpoint, tiny_model, tok,
                                                                              tmp_path):  # fmt: skip
    url, _ = models_endpoint([{"id": "other", "max_model_len": 9}, {"id": "alia", "max_model_len": 2048}])
    served = niah.find_context(endpoint=niah.OpenAIBackend(url, "alia"), tokenizer=tiny_model(1024))
    assert served == niah.Context(2048, f"max_model_len of 'alia' at {url}/models")  # what the server accepts
    url, _ = models_endpoint([])
    assert niah.find_context(endpoint=niah.OpenAIBackend(url, "alia"), tokenizer=tiny_model(1024)).tokens == 1024
    tok.save_pretrained(str(tmp_path / "tok"))  # a tokenizer alone: no config.json
    unknown = niah.find_context(endpoint=niah.OpenAIBackend(url, "alia"), tokenizer=str(tmp_path / "tok"))
    assert unknown.tokens is None and f"{url}/models gives no max_model_len for 'alia'" in unknown.source
    assert f"no config.json in {tmp_path / 'tok'}" in unknown.source
    head = niah.grid_lines(niah.default_lengths(None), CARD_DEPTHS, unknown, explicit=False)[0]
    assert head.endswith("assuming the card's lengths, up to 163,840 tokens")


def test_an_endpoint_run_prints_its_grid_first_and_sends_only_the_grids_requests(models_endpoint, tiny_model,
                                                                                 tmp_path, capsys):  # fmt: skip
    url, chats = models_endpoint([{"id": "alia", "max_model_len": 256}])
    assert main(["eval", "niah", "--endpoint", url, "--served-model", "alia", "--tokenizer", tiny_model(1024),
                 "--out", str(tmp_path), "--depths", "0,100"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"the model's context is 256 tokens (max_model_len of 'alia' at {url}/models)" in out
    assert "lengths (prompt tokens): 64, 128, 256\n" in out
    assert out.index("lengths (prompt tokens)") < out.index("time estimate from the first trial on")
    assert out.index("time estimate from the first trial on") < out.index("niah [1/6, ")
    assert " left] " in out[out.index("niah [1/6, ") :] and "niah [6/6, done]" in out
    assert len(chats) == 6  # no probe requests: only the grid's
    res = json.loads((tmp_path / "niah.json").read_text())
    assert res["context"] == 256 and len(res["trials"]) == 6
