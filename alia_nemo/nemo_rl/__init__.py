"""Plugins NeMo-RL loads by dotted path. Importing this package never imports NeMo-RL.

- ``alia_nemo.nemo_rl.AliaSFTDataset``: a prepared SFT mixture as a NeMo-RL raw dataset.
- ``alia_nemo.nemo_rl.alia_sft_processor``: ChatML tokens with assistant-only loss masks as a DatumSpec.
- ``alia_nemo.nemo_rl.AliaTextDataset`` / ``alia_text_processor``: a token-packed CPT corpus, every token trained.
"""

from alia_nemo.nemo_rl.dataset import AliaSFTDataset
from alia_nemo.nemo_rl.processor import alia_sft_processor
from alia_nemo.nemo_rl.text_dataset import AliaTextDataset, alia_text_processor

__all__ = ["AliaSFTDataset", "AliaTextDataset", "alia_sft_processor", "alia_text_processor"]
