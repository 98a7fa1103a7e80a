"""Bundled sample data: a few hundred short SFT conversations we wrote ourselves (CC0-1.0)."""

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent


def sample_path(name: str = "sft_sample.jsonl") -> Path:
    """Absolute path of a bundled sample file."""
    path = SAMPLE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample {name!r} not found in {SAMPLE_DIR}")
    return path
