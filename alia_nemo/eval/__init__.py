"""The card's evaluations: needle in a haystack against an export or an OpenAI-compatible endpoint, and the
card's lm-evaluation-harness task lists.
"""
