"""Is a checkpoint whole? Fast integrity checks that load no model.

A job killed while writing (time limit, full disk, node failure) leaves files that look like a checkpoint but
do not load, or worse, load garbage. These checks read only headers, sizes and index files (plus zip CRCs for
``torch.save`` files), so they cost seconds even for a 40B model, and each answers with ``None`` (sound) or one
line naming the file and what is wrong with it:

- :func:`safetensors_problem`: one ``*.safetensors`` file (header, dtypes and shapes against offsets, size);
- :func:`weights_problem`: a Hugging Face model directory (``config.json``, every shard, the shard index);
- :func:`torch_file_problem`: a ``torch.save`` file (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``);
- :func:`dcp_problem`: a ``torch.distributed.checkpoint`` directory (NeMo-RL's ``policy/weights`` and
  ``policy/optimizer``, Megatron's ``iter_N``);
- :func:`checkpoint_problem`: any of our checkpoint directories (a model directory, a transformers Trainer
  ``checkpoint-N``, a NeMo-RL ``step_N``), checked with the above.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Bits per element of the safetensors dtypes (sub-byte float formats included); unknown dtypes skip the size check.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
    "U32": 32, "I32": 32, "F32": 32, "C64": 64,
    "U64": 64, "I64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # what torch.save writes in Trainer and NeMo-RL checkpoints


def _size(path: Path) -> int | str:
    """The file's size, or a reason it has none (missing, a directory, unreadable)."""
    try:
        if not path.is_file():
            return f"{path}: missing" if not path.exists() else f"{path}: not a file"
        return path.stat().st_size
    except OSError as exc:
        return f"{path}: unreadable ({exc.strerror or exc})"


def _read_header(path: Path) -> tuple[dict[str, Any] | None, int, str | None]:
    """(the JSON header of a safetensors file, where its data starts, None), or (None, 0, why it is unreadable)."""
    size = _size(path)
    if isinstance(size, str):
        return None, 0, size
    if size < 8:
        return None, 0, f"{path}: {size} bytes, shorter than the 8-byte safetensors header length (truncated)"
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER or 8 + header_len > size:
                why = f"header length {header_len} does not fit in its {size} bytes (truncated or corrupt)"
                return None, 0, f"{path}: {why}"
            raw = f.read(header_len)
    except OSError as exc:
        return None, 0, f"{path}: unreadable ({exc.strerror or exc})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, 0, f"{path}: corrupt safetensors header (not JSON: {exc})"
    if not isinstance(header, dict):
        return None, 0, f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
    return header, 8 + header_len, None


def safetensors_problem(path: str | Path) -> str | None:
    """Why the safetensors file at ``path`` would not load (missing, truncated, corrupt header), or None.

    Reads only the header: each tensor's byte range must match its dtype and shape, the ranges must tile the
    data section without gaps or overlaps, and the file must end exactly where the last one does (what the
    safetensors library itself requires).
    """
    path = Path(path)
    header, data_start, problem = _read_header(path)
    if header is None:
        return problem
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and all(isinstance(d, int) for d in shape)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            return f"{path}: corrupt safetensors header (tensor {name!r} has no dtype, shape and data_offsets)"
        if not 0 <= begin <= end:
            return f"{path}: corrupt safetensors header (tensor {name!r} has offsets {begin}..{end})"
        bits = DTYPE_BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            return (
                f"{path}: corrupt safetensors header (tensor {name!r}: {dtype} {shape} needs "
                f"{math.prod(shape) * bits // 8} bytes, its offsets span {end - begin})"
            )
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            return f"{path}: corrupt safetensors header (tensor {name!r} starts at {begin}, expected {position})"
        position = end
    size = path.stat().st_size
    expected = data_start + position
    if size < expected:
        return f"{path}: truncated, {size} bytes of the {expected} its header describes"
    if size > expected:
        return f"{path}: {size - expected} bytes after the last tensor its header describes (corrupt)"
    return None


def weights_problem(directory: str | Path) -> str | None:
    """Why the Hugging Face model directory would not load, or None.

    ``config.json`` must parse; every ``*.safetensors`` file must be sound; when there is a
    ``model.safetensors.index.json``, every shard it names must be there and hold the tensors it lists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not a directory" if directory.exists() else f"{directory}: missing"
    config = directory / "config.json"
    problem = _json_problem(config)
    if problem:
        return problem
    files = sorted(directory.glob("*.safetensors"))
    index = directory / SAFETENSORS_INDEX
    if not files and not index.exists():
        return f"{directory}: no safetensors weights (*.safetensors)"
    shards: dict[str, list[str]] = {}
    if index.exists():
        problem = _json_problem(index)
        if problem:
            return problem
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{index}: corrupt (no weight_map)"
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, []).append(tensor)
        for shard in shards:
            if not (directory / shard).is_file():
                return f"{directory / shard}: missing (named by {SAFETENSORS_INDEX})"
    for f in sorted({*files, *(directory / s for s in shards)}):
        problem = safetensors_problem(f)
        if problem:
            return problem
    for shard, tensors in shards.items():
        header, _, _ = _read_header(directory / shard)
        absent = [t for t in tensors if t not in (header or {})]
        if absent:
            return f"{directory / shard}: lacks {len(absent)} tensor(s) {SAFETENSORS_INDEX} puts there ({absent[0]})"
    return None


def torch_file_problem(path: str | Path, crc: bool = True) -> str | None:
    """Why a ``torch.save`` file (a zip archive) would not load: missing, truncated, or a bad CRC; or None.

    ``crc`` reads the whole file to check every member's CRC (what catches damage in the middle); without it
    only the zip directory at the end is checked (what catches truncation), which reads a few bytes.
    """
    path = Path(path)
    size = _size(path)
    if isinstance(size, str):
        return size
    if size == 0:
        return f"{path}: empty"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if crc else None
    except zipfile.BadZipFile as exc:
        return f"{path}: not a complete zip archive as torch.save writes (truncated or corrupt: {exc})"
    except (OSError, EOFError, zlib.error) as exc:
        return f"{path}: unreadable or truncated ({exc})"
    if bad is not None:
        return f"{path}: member {bad} fails its CRC check (corrupt)"
    return None


def dcp_problem(directory: str | Path) -> str | None:
    """Why a ``torch.distributed.checkpoint`` directory would not load, or None.

    Its ``.metadata`` must load, and every storage file it references must exist and reach the largest
    offset + length recorded in it (a truncated ``.distcp`` file is shorter).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not a directory" if directory.exists() else f"{directory}: missing"
    if not (directory / ".metadata").is_file():
        return f"{directory / '.metadata'}: missing (not a complete torch.distributed.checkpoint)"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f"{directory / '.metadata'}: unreadable ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    if not ends and getattr(metadata, "state_dict_metadata", None):
        return f"{directory / '.metadata'}: names no storage files (corrupt)"
    for name, end in sorted(ends.items()):
        size = _size(directory / name)
        if isinstance(size, str):
            return f"{size} (referenced by {directory / '.metadata'})"
        if size < end:
            return f"{directory / name}: truncated, {size} bytes of the {end} that .metadata references"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path}: corrupt ({exc})"
    return None


def _dcp_tree_problem(directory: Path) -> str | None:
    """A DCP directory, or one holding DCP directories (Megatron's ``iter_N``), or safetensors weights."""
    if (directory / ".metadata").is_file():
        return dcp_problem(directory)
    nested = sorted(p.parent for p in directory.glob("*/.metadata"))
    if nested:
        return next(filter(None, (dcp_problem(d) for d in nested)), None)
    if any(directory.glob("*.safetensors")) or (directory / "config.json").is_file():
        return weights_problem(directory)
    return f"{directory}: no checkpoint files (.metadata, *.safetensors)"


def checkpoint_problem(directory: str | Path, crc: bool = True) -> str | None:
    """Why a checkpoint directory would not resume or export, or None.

    Knows a NeMo-RL ``step_N`` (``policy/weights`` and ``policy/optimizer``, DCP or Megatron), a bare DCP
    directory, and a Hugging Face model directory or transformers Trainer ``checkpoint-N`` (weights, the
    ``torch.save`` files such as ``optimizer.pt``, ``trainer_state.json``). ``crc`` as in
    :func:`torch_file_problem`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not a directory" if directory.exists() else f"{directory}: missing"
    if (directory / ".metadata").is_file():
        return dcp_problem(directory)
    checks: list[Callable[[], str | None]] = []
    if (directory / "policy").is_dir():  # NeMo-RL step_N
        weights, optimizer = directory / "policy" / "weights", directory / "policy" / "optimizer"
        if not weights.is_dir():
            return f"{weights}: missing"
        checks.append(lambda: _dcp_tree_problem(weights))
        if optimizer.is_dir():
            checks.append(lambda: _dcp_tree_problem(optimizer))
    elif any(directory.glob("*.safetensors")) or (directory / SAFETENSORS_INDEX).exists():
        checks.append(lambda: weights_problem(directory))
    else:
        return f"{directory}: no checkpoint weights (*.safetensors, policy/weights, .metadata)"
    checks += [lambda f=f: _json_problem(f) for f in sorted(directory.glob("*.json"))]
    torch_files = sorted(p for p in directory.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    checks += [lambda f=f: torch_file_problem(f, crc=crc) for f in torch_files]
    return next(filter(None, (check() for check in checks)), None)
