"""Engine errors the front end (server) distinguishes. One home so every CoreClient raises the same classes."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core stopped (process died, thread failed, shut down); no request can make progress."""


class RequestError(RuntimeError):
    """The engine failed one request (e.g. it can never fit in the KV cache); others continue."""


class UtilityError(RuntimeError):
    """An engine utility call (e.g. add_lora) failed for a reason other than bad input; the engine goes on."""
