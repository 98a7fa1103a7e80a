"""A finished stage -> a Hugging Face directory that transformers and vLLM load as is.

Local-engine outputs (``final/`` or a ``checkpoints/checkpoint-N``) are copied: safetensors weights,
``config.json`` (the stage's context length and RoPE scaling, as trained), the tokenizer with our ChatML
template written into ``tokenizer_config.json`` (and ``chat_template.jinja``), and ``generation_config.json``
with the card's defaults. NeMo-RL checkpoints (``step_N/policy/weights``) are converted first by NeMo-RL's
own converters (``examples/converters``: DTensor/DCP, or Megatron through Megatron-Bridge), then finished
the same way, with the weights as safetensors in the model's dtype.

NeMo-RL's converters read RoPE and context overrides from ``policy.hf_overrides``, while its training reads
``policy.hf_config_overrides`` (what we compile); they are handed a copy of the step's ``config.yaml`` that
carries both, so an exported CPT model keeps the RoPE it was trained with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alia_nemo.errors import AliaError, ConfigError
from alia_nemo.model import checkpoints
from alia_nemo.model.chatml import CHAT_TEMPLATE, GENERATION_DEFAULTS

WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json")
EXPORT_INFO = "alia_export.json"  # where an export came from (source directory, checkpoint step)
# NeMo-RL's image prebuilds one venv per worker class under NEMO_RL_VENV_DIR; only the Megatron worker's
# has megatron-bridge, which the Megatron converter needs.
MEGATRON_WORKER = "nemo_rl.models.policy.workers.megatron_policy_worker.MegatronPolicyWorker"
IMAGE_VENV_DIR = "/opt/ray_venvs"


class ExportError(AliaError, RuntimeError):
    """A conversion or export that ran and failed; names the command and what to check."""


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (``os.umask`` reads it only by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode ``open()`` gives a new file (``0o666 & ~umask``, 0644 under the
    usual umask 022) and every folder ``0o777 & ~umask``, so a serving account can read a model like its config.

    safetensors 0.8 writes a file atomically through a temporary file, which is created 0600 and renamed into place,
    so ``model.safetensors`` came out 0600 beside a 0644 ``config.json``; ``shutil.copy2`` and NeMo-RL's converters
    carry that mode along. Called on every model directory we write (``final/``, exports) before it is used.
    """
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def resolve_source(path: Path) -> Path:
    """The directory holding the weights: a run dir's ``final/``, or the path itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--from {path} does not exist; pass a run directory, its final/, or a checkpoint")
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
    """The newest ``step_N/policy/weights`` under a run, its ``checkpoints/``, or a ``step_N`` directory."""
    path = Path(path)
    if (path / "policy" / "weights").is_dir():
        return path / "policy" / "weights"
    for root in (path, path / "checkpoints"):
        steps = sorted(root.glob("step_*/policy/weights"), key=lambda p: int(p.parent.parent.name.split("_")[1]))
        if steps:
            return steps[-1]
    return None


def megatron_iteration(weights: Path) -> Path | None:
    """The newest ``iter_*`` directory of a Megatron checkpoint (None for DCP checkpoints)."""
    iterations = sorted(Path(weights).glob("iter_*"))
    return iterations[-1] if iterations else None


def converter_python(megatron: bool, environ: dict[str, str] | None = None) -> str:
    """The Python that runs a converter: this one for DCP; the Megatron worker venv's for Megatron."""
    if not megatron:
        return sys.executable
    environ = dict(os.environ if environ is None else environ)
    python = Path(environ.get("NEMO_RL_VENV_DIR", IMAGE_VENV_DIR)) / MEGATRON_WORKER / "bin" / "python"
    if not python.exists():
        raise ConfigError(
            f"converting a Megatron checkpoint needs megatron-bridge, which NeMo-RL's image has only in the "
            f"Megatron worker venv; {python} does not exist. Run inside the NeMo-RL container, or set "
            "NEMO_RL_VENV_DIR to the directory holding its worker venvs"
        )
    return str(python)


def converter_command(weights: Path, config: Path, out: Path, examples: Path, python: str) -> list[str]:
    """NeMo-RL's converter invocation for ``step_N/policy/weights`` (Megatron when it holds ``iter_*``)."""
    iteration = megatron_iteration(weights)
    if iteration is not None:
        script, flag, source = "convert_megatron_to_hf.py", "--megatron-ckpt-path", iteration
    else:
        script, flag, source = "convert_dcp_to_hf.py", "--dcp-ckpt-path", weights
    return [python, str(examples / script), "--config", str(config), flag, str(source), "--hf-ckpt-path", str(out)]


def converter_config(step_config: Path, dest: Path) -> Path:
    """A copy of a step's ``config.yaml`` whose ``policy.hf_overrides`` carries ``policy.hf_config_overrides``."""
    import yaml

    config = yaml.safe_load(Path(step_config).read_text())
    policy = config["policy"]
    overrides = {**(policy.get("hf_config_overrides") or {}), **(policy.get("hf_overrides") or {})}
    policy["hf_overrides"] = overrides
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _nemo_rl_examples() -> Path:
    # Located, not imported: the converters run in their own process, and export stays free of NeMo-RL's code.
    from importlib.util import find_spec

    spec = find_spec("nemo_rl")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "converting a NeMo-RL checkpoint needs NeMo-RL's container (its converters and Megatron-Bridge); "
            "run `alia-nemo export` there (apptainer exec IMAGE alia-nemo export ...)"
        )
    examples = Path(spec.origin).resolve().parent.parent / "examples" / "converters"
    if not examples.is_dir():
        raise ConfigError(f"NeMo-RL's converters are not next to its package ({examples} is missing)")
    return examples


def convert_nemo_rl(weights: Path, out: Path) -> None:
    """Run NeMo-RL's own converter on ``step_N/policy/weights`` into ``out`` (which must not exist yet)."""
    examples = _nemo_rl_examples()
    step_dir = Path(weights).parents[1]  # NeMo-RL saves the run's config in each step_N/
    python = converter_python(megatron_iteration(weights) is not None)
    with tempfile.TemporaryDirectory(prefix=".alia-convert-", dir=out.parent) as scratch:
        config = converter_config(step_dir / "config.yaml", Path(scratch) / "config.yaml")
        args = converter_command(weights, config, out, examples, python)
        proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(
            f"NeMo-RL's converter failed (exit {proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}"
        )
    _as_safetensors(out)


def _as_safetensors(model_dir: Path) -> None:
    """Replace a converter's ``pytorch_model.bin`` by safetensors shards in the dtype ``config.json`` names."""
    binary = model_dir / "pytorch_model.bin"
    if not binary.is_file():
        return
    import torch
    from huggingface_hub import save_torch_state_dict

    config = json.loads((model_dir / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    state = torch.load(binary, map_location="cpu", mmap=True, weights_only=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_torch_state_dict(state, str(model_dir), max_shard_size="5GB")
    binary.unlink()


def export(source: Path, out: Path, tokenizer: str | None = None, *, force: bool = False) -> Path:
    """Write the Hugging Face directory ``out`` from a finished stage at ``source``; return ``out``.

    Nothing the user made is ever deleted or written through: ``out`` may not be (or be inside, or contain) the
    source, nor a symbolic link; an existing non-empty ``out`` is refused unless ``force``, and even then it is
    replaced only when it is a previous export (it holds ``alia_export.json`` and nothing export did not write).
    The source's weights are checked for truncation and corruption first, the result before it is put in place.
    The export is built in a fresh hidden directory next to ``out`` (``.<name>.export-*``) and renamed into place
    at the end; on any failure ``out`` is as it was.
    """
    from transformers import GenerationConfig

    src = resolve_source(source)
    weights = nemo_rl_checkpoint(src) if not (src / "config.json").is_file() else None
    sources = [Path(source), src, *([weights.parents[1]] if weights is not None else [])]
    out = check_out(out, sources, force)
    if tokenizer:  # before a conversion that can take hours, not after it
        from alia_nemo.model.hub_cache import local_path_problem
        from alia_nemo.model.tokenizer import TokenizerError

        problem = local_path_problem("--tokenizer", tokenizer, "tokenizer")
        if problem:
            raise TokenizerError(problem)
    files = [f for pattern in WEIGHT_GLOBS for f in src.glob(pattern)] if weights is None else []
    if weights is None and not files:
        raise ConfigError(f"{src} has no safetensors weights; export needs a finished stage (final/)")
    problem = source_problem(src, weights)
    if problem:
        raise ExportError(
            f"the checkpoint at {src} is incomplete or corrupt: {problem}. A job killed while saving leaves this; "
            f"export an earlier checkpoint instead{_earlier_checkpoints(src, weights)}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Our own fresh staging directory (never a fixed name a user directory could have): the only thing removed.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        model_dir = staging / "model"  # created with the umask's permissions, unlike mkdtemp's 0700
        info: dict[str, object] = {"source": str(src)}
        if weights is not None:
            convert_nemo_rl(weights, model_dir)
            info.update(source=str(weights.parents[1]), step=int(weights.parents[1].name.split("_")[1]))
        else:
            model_dir.mkdir()
            for f in [*files, src / "config.json"]:
                shutil.copy2(f, model_dir / f.name)
        _finish(model_dir, src, weights, tokenizer)
        GenerationConfig(**GENERATION_DEFAULTS).save_pretrained(str(model_dir))
        # What export wrote: --force later replaces this directory only while it holds nothing else.
        info["files"] = sorted({p.name for p in model_dir.iterdir()} | {EXPORT_INFO})
        (model_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        umask_modes(model_dir)  # copied or converted weights come 0600 (see umask_modes); the export is shared
        problem = checkpoints.weights_problem(model_dir)
        if problem:
            raise ExportError(f"the exported model failed its integrity check ({problem}); {out} was left as it was")
        _put_in_place(model_dir, check_out(out, sources, force))  # checked again: a conversion can take hours
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_out(out: Path, sources: list[Path], force: bool = False) -> Path:
    """The absolute ``--out`` path, once it is safe to (re)place; ExportError naming the reason otherwise."""
    given = Path(out).expanduser()
    out = Path(os.path.abspath(given))  # normalised without following a link at out itself
    if out.is_symlink():
        raise ExportError(
            f"--out {given} is a symbolic link (to {os.readlink(out)}); export never writes through one. "
            "Give the real directory path, or a new one"
        )
    real = out.parent.resolve() / out.name  # where it really is, whatever links lead to its parent
    for source in sources:
        source = Path(source).expanduser().resolve()
        relation = ("is" if real == source else "is inside" if real.is_relative_to(source)
                    else "contains" if source.is_relative_to(real) else None)  # fmt: skip
        if relation:
            raise ExportError(
                f"--out {given} {relation} the source {source}; exporting there would overwrite or delete what "
                "the export reads. Choose an --out outside the run directory"
            )
    if not out.exists():
        return out
    if not out.is_dir():
        raise ExportError(f"--out {given} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return out
    if not force:
        raise ExportError(
            f"--out {given} exists and is not empty; choose a new directory, or pass --force to replace a previous "
            f"export there (a directory export wrote, with {EXPORT_INFO})"
        )
    marker = out / EXPORT_INFO
    if not marker.is_file():
        raise ExportError(
            f"--out {given} is not a previous export (it has no {EXPORT_INFO}); --force replaces only export's own "
            "output, never other directories. Choose another --out, or move that directory away yourself"
        )
    try:
        written = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError(f"{marker} is unreadable ({exc}); not replacing {given}. Choose another --out") from None
    foreign = sorted(p.name for p in out.iterdir() if isinstance(written, list) and p.name not in written)
    if foreign:
        raise ExportError(
            f"--out {given} is a previous export that now also holds files export did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); --force would delete them. Move them "
            "away, or choose another --out"
        )
    return out


def source_problem(src: Path, weights: Path | None) -> str | None:
    """Why the source's weights are incomplete or corrupt (one line naming the file), or None.

    ``weights`` is the NeMo-RL ``step_N/policy/weights`` being exported, or None for a Hugging Face directory.
    """
    if weights is None:
        return checkpoints.weights_problem(src)
    iteration = megatron_iteration(weights)
    if iteration is not None:  # Megatron's torch_dist format is DCP plus common.pt
        if (iteration / ".metadata").is_file():
            return checkpoints.dcp_problem(iteration)
        common = iteration / "common.pt"
        return checkpoints.torch_file_problem(common) if common.is_file() else None
    return checkpoints.dcp_problem(weights)


def _earlier_checkpoints(src: Path, weights: Path | None) -> str:
    """``: --from A, --from B`` for up to three other checkpoints of the same run, newest first ("" if none)."""
    if weights is not None:
        step = weights.parents[1]
        found = [p.parents[1] for p in step.parent.glob("step_*/policy/weights") if p.parents[1] != step]
    else:
        found = [p for base in (src.parent / "checkpoints", src.parent) for p in base.glob("checkpoint-*")
                 if p.is_dir() and p.resolve() != src.resolve()]  # fmt: skip

    def number(p: Path) -> int:
        digits = p.name.rpartition("_" if weights is not None else "-")[2]
        return int(digits) if digits.isdigit() else -1

    found = sorted(set(found), key=number, reverse=True)[:3]
    return (": " + ", ".join(f"--from {p}" for p in found)) if found else " (or rerun the stage)"


def _put_in_place(model_dir: Path, out: Path) -> None:
    """Rename ``model_dir`` to ``out``; a previous export there (checked by :func:`check_out`) is swapped out first
    and deleted only once the new one is in place (restored if that fails)."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(model_dir, out)  # rename(2) replaces an empty directory atomically
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(model_dir, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _finish(model_dir: Path, src: Path, weights: Path | None, tokenizer: str | None) -> None:
    """Tokenizer with our ChatML template (also in tokenizer_config.json for vLLM), eos ids in config.json."""
    from transformers import AutoTokenizer

    from alia_nemo.model.tokenizer import load_tokenizer, with_chatml

    candidates = [model_dir, src] + ([weights.parent / "tokenizer"] if weights is not None else [])
    found = next((d for d in candidates if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()),
                 None)  # fmt: skip
    if tokenizer:
        tok = load_tokenizer(tokenizer, key="--tokenizer")
    elif found is not None:
        tok = with_chatml(AutoTokenizer.from_pretrained(str(found)))
    else:
        raise ConfigError(f"{src} has no tokenizer; pass --tokenizer (a directory or cached hub id)")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(model_dir))
    # vLLM and older transformers read the template from tokenizer_config.json: put it there too.
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = GENERATION_DEFAULTS["eos_token_id"]
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
