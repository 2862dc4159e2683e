"""Constrained decoding (JSON schema, regex, choice, EBNF grammar, any JSON object) with xgrammar.

The engine core talks to one StructuredOutputManager (manager.py); the sampler applies its per-step bitmask
(apply_bitmask). `validate` lets the server reject a bad constraint before it reaches the core.
Nothing here imports torch or xgrammar at module level: engine/ may import this package.
"""

from tokenmill.structured_output.compile import validate
from tokenmill.structured_output.manager import StructuredOutputManager, apply_bitmask

__all__ = ["StructuredOutputManager", "apply_bitmask", "validate"]
