"""Configuration: the strict schema (unknown keys refused at every depth), Hydra composition of groups and
recipes, the one resolution of a validated config into the numbers every command reports
(:mod:`alia_nemo.config.resolve`), the parallel-layout planner, and the translation of a resolved stage into
NeMo-RL's config (:mod:`alia_nemo.config.to_nemo_rl`, checked by :mod:`alia_nemo.config.nemo_rl_schema`).
"""
