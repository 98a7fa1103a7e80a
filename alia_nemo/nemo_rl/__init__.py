"""Plugins NeMo-RL loads by dotted path. Importing this package never imports NeMo-RL.

- ``alia_nemo.nemo_rl.AliaSFTDataset``: a prepared SFT mixture as a NeMo-RL raw dataset.
- ``alia_nemo.nemo_rl.alia_sft_processor``: ChatML tokens with assistant-only loss masks as a DatumSpec.
- ``alia_nemo.nemo_rl.AliaTextDataset`` / ``alia_text_processor``: a token-packed CPT corpus, every token trained.
- ``alia_nemo.nemo_rl.AliaPreferenceDataset`` / ``alia_preference_processor``: prepared preference pairs for DPO,
  each sequence's last message-log entry exactly the answer's trained tokens.
"""

from alia_nemo.nemo_rl.dataset import AliaSFTDataset
from alia_nemo.nemo_rl.preference import AliaPreferenceDataset, alia_preference_processor
from alia_nemo.nemo_rl.processor import alia_sft_processor
from alia_nemo.nemo_rl.text_dataset import AliaTextDataset, alia_text_processor

__all__ = [
    "AliaPreferenceDataset",
    "AliaSFTDataset",
    "AliaTextDataset",
    "alia_preference_processor",
    "alia_sft_processor",
    "alia_text_processor",
]
