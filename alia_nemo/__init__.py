"""alia-nemo: recipes and NeMo-RL plugins that reproduce the post-training of ALIA-40b-instruct."""

__version__ = "0.1.0"
