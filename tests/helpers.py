"""Test helpers: small data files and a tiny model whose per-token losses differ a lot."""

from __future__ import annotations

import json
from pathlib import Path

# The one-GPU NeMo-RL recipe, and what the CPU harness runs it with: NeMo-RL's plain DTensor worker (v2 needs
# NeMo AutoModel's CUDA venv) in float32.
NEMO_RL_TINY = "sft-alia-tiny-1n1g-dtensor"
NEMO_RL_HARNESS = ["engine.dtensor_worker=v1", "model.dtype=float32"]

ANSWERS = [
    "Sí.",
    "Dimarts.",
    "La capital de França és París, una ciutat molt gran i molt bonica amb molts museus "
    "i monuments que visiten milions de persones cada any.",
    "4.",
]


def write_uneven_conversations(path: Path) -> str:
    """Four conversations whose answers range from one word to a long sentence."""
    rows = [
        {
            "id": f"u{i}",
            "language": "ca",
            "messages": [{"role": "user", "content": f"Pregunta {i}?"}, {"role": "assistant", "content": a}],
        }
        for i, a in enumerate(ANSWERS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def save_peaked_tiny_model(path: Path, seed: int = 0) -> str:
    """A randomly initialised alia_tiny with a sharpened output layer, so token losses vary widely
    (at plain random init every token costs ~ln(1024) and averaging schemes are indistinguishable)."""
    import torch
    from transformers import LlamaForCausalLM

    from alia_nemo.model.architectures import get_spec

    torch.manual_seed(seed)
    model = LlamaForCausalLM(get_spec("alia_tiny").hf_config(256))
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    model.save_pretrained(path)
    return str(path)


def save_nan_tiny_model(path: Path, with_tokenizer: bool = False) -> str:
    """A tiny ALIA whose final norm is NaN, so the very first loss is NaN (a corrupt starting checkpoint)."""
    import torch
    from transformers import LlamaForCausalLM

    from alia_nemo.model.architectures import get_spec

    model = LlamaForCausalLM(get_spec("alia_tiny").hf_config(256))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(path)
    if with_tokenizer:
        from alia_nemo.model.tokenizer import load_tokenizer

        load_tokenizer("builtin:test").save_pretrained(path)
    return str(path)


def token_and_sequence_means(model_dir: str, rows: list[dict]) -> tuple[float, float]:
    """(mean over all trained tokens, mean of per-conversation means) of the next-token loss."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count, seq_means = 0.0, 0, []
    with torch.no_grad():
        for r in rows:
            logits = model(torch.tensor([r["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            losses = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")[labels != -100]
            total += losses.sum().item()
            count += losses.numel()
            seq_means.append(losses.mean().item())
    return total / count, sum(seq_means) / len(seq_means)


def uneven_overrides(model_dir: str, data_file: str, output_dir: Path, steps: int) -> list[str]:
    """Overrides that train the peaked model on the four uneven conversations, one global batch per step."""
    return [
        f"model.pretrained={model_dir}",
        "data=jsonl",
        f"data.files=[{data_file}]",
        "data.val_fraction=0",
        "stage.global_batch_size=4",
        "stage.micro_batch_size=1",
        f"stage.max_steps={steps}",
        "stage.warmup_steps=0",
        f"run.output_dir={output_dir}",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ChatServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 for tests: ``reply(request body) -> (HTTP status,
    message content)`` decides each answer. ``url`` is its /v1 base; ``close()`` stops it."""

    def __init__(self, reply):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                status, content = reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps(payload).encode())
                except OSError:
                    pass  # the client is gone (timed out or killed)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def plotted_curves(metrics: Path, png: Path) -> dict[str, list[tuple[float, float]]]:
    """The curves :func:`alia_nemo.plots.plot_loss` draws from ``metrics``, read off its figure: label -> points.

    The figure is kept open (``pyplot.close`` stubbed while plotting) so the test sees what ``loss.png`` shows.
    """
    from unittest import mock

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alia_nemo.plots import plot_loss

    with mock.patch.object(plt, "close") as close:
        plot_loss(metrics, png)
    fig = close.call_args.args[0]
    curves = {
        str(line.get_label()): [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
        for ax in fig.axes
        for line in ax.get_lines()
    }
    plt.close(fig)
    return curves
