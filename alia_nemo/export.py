"""A finished stage -> a Hugging Face directory that transformers and vLLM load as is.

Local-engine outputs (``final/`` or a ``checkpoints/checkpoint-N``) are copied: safetensors weights,
``config.json`` (the stage's context length and RoPE scaling, as trained), the tokenizer with our ChatML
template written into ``tokenizer_config.json`` (and ``chat_template.jinja``), and ``generation_config.json``
with the card's defaults. NeMo-RL checkpoints are converted first with the converters that ship in
NeMo-RL's container (DTensor or Megatron format), then finished the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from alia_nemo.chatml import CHAT_TEMPLATE
from alia_nemo.config_schema import ConfigError
from alia_nemo.hf_training import GENERATION_DEFAULTS

WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json")


def resolve_source(path: Path) -> Path:
    """The directory holding the weights: a run dir's ``final/``, or the path itself."""
    path = Path(path).expanduser()
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "config.json").is_file():
        return path
    if nemo_rl_checkpoint(path):
        return path
    raise ConfigError(
        f"{path} is neither a run directory with final/, a Hugging Face model directory, nor a NeMo-RL "
        "checkpoint (step_N/policy/weights); pass --from pointing at one of those"
    )


def nemo_rl_checkpoint(path: Path) -> Path | None:
    """The newest ``step_N/policy/weights`` under a NeMo-RL checkpoint directory (or the path itself)."""
    path = Path(path)
    if (path / "policy" / "weights").is_dir():
        return path / "policy" / "weights"
    steps = sorted(path.glob("step_*/policy/weights"), key=lambda p: int(p.parent.parent.name.split("_")[1]))
    return steps[-1] if steps else None


def converter_command(weights: Path, out: Path, examples: Path) -> list[str]:
    """NeMo-RL's converter invocation for ``step_N/policy/weights`` (Megatron if it holds iter_* dirs)."""
    megatron = any(weights.glob("iter_*"))
    script = examples / ("convert_megatron_to_hf.py" if megatron else "convert_dcp_to_hf.py")
    config = weights.parents[1] / "config.yaml"  # NeMo-RL saves the run's config in each step_N/
    weights_flag = "--megatron-ckpt-path" if megatron else "--dcp-ckpt-path"
    return [
        sys.executable,
        str(script),
        "--config",
        str(config),
        weights_flag,
        str(weights),
        "--hf-ckpt-path",
        str(out),
    ]


def convert_nemo_rl(weights: Path, out: Path) -> None:
    """Run NeMo-RL's own converter (DTensor/DCP or Megatron) inside its container environment."""
    try:
        import nemo_rl
    except ImportError:
        raise ConfigError(
            "converting a NeMo-RL checkpoint needs NeMo-RL's container (its converters and Megatron-Bridge); "
            "run `alia-nemo export` there (apptainer exec IMAGE alia-nemo export ...)"
        ) from None
    examples = Path(nemo_rl.__file__).resolve().parent.parent / "examples" / "converters"
    args = converter_command(weights, out, examples)
    if not Path(args[1]).is_file():
        raise ConfigError(f"NeMo-RL converter {args[1]} not found in this installation")
    subprocess.run(args, check=True)


def export(source: Path, out: Path, tokenizer: str | None = None) -> Path:
    """Write the Hugging Face directory ``out`` from a finished stage at ``source``; return ``out``."""
    from transformers import AutoTokenizer, GenerationConfig

    from alia_nemo.tokenizer import load_tokenizer, with_chatml

    src = resolve_source(source)
    out = Path(out).expanduser()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = nemo_rl_checkpoint(src) if not (src / "config.json").is_file() else None
    if weights is not None:
        convert_nemo_rl(weights, tmp)
        model_dir = tmp
    else:
        model_dir = src
        files = [f for pattern in WEIGHT_GLOBS for f in src.glob(pattern)]
        if not any(f.suffix == ".safetensors" for f in files):
            raise ConfigError(f"{src} has no safetensors weights; export needs a finished stage (final/)")
        for f in [*files, src / "config.json"]:
            shutil.copy2(f, tmp / f.name)
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif has_tokenizer:
        tok = with_chatml(AutoTokenizer.from_pretrained(str(model_dir)))
    else:
        raise ConfigError(f"{src} has no tokenizer; pass --tokenizer (a directory or cached hub id)")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tmp))
    # vLLM and older transformers read the template from tokenizer_config.json: put it there too.
    cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    GenerationConfig(**GENERATION_DEFAULTS).save_pretrained(str(tmp))
    config = json.loads((tmp / "config.json").read_text())
    config["eos_token_id"] = GENERATION_DEFAULTS["eos_token_id"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
