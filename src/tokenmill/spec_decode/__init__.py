"""Speculative decoding: proposers (n-gram lookup, draft model) and verification of their drafts.

The runner asks its proposer for drafts after each step's sampling (ModelOutput.draft_token_ids); the scheduler
budgets them as extra input tokens of the next step; the runner scores them in that step's one forward pass and
keeps the accepted prefix plus one token of its own (verify.py).
"""
