"""Training data: one data source per ``data.format`` (registered in :mod:`alia_nemo.data.sources`, the only
place that dispatches on the data config), the SFT mixture's source adapters and selection, the plain-text
corpus and its token packing, and the prepared-data cache (:mod:`alia_nemo.data.cache`) they all write through.
Imports no engine, launcher or CLI module.
"""
