"""The ALIA model family as files and numbers: architecture specs (tiny, 2b, 7b, 40b) and their RoPE, the
tokenizer and its ChatML template with assistant-only loss masks, checkpoint integrity checks, the Hugging Face
cache on offline nodes, and the export of a finished stage. Imports no engine, launcher, config compiler or CLI.
"""
