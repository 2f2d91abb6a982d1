"""The one error type the adapters package raises for a bad adapter or a bad adapter request.

The HTTP layer maps :class:`AdapterError` onto the OpenAI error envelope: ``code`` becomes
the envelope's ``code``, the message its ``message``. Messages are short and never contain
server filesystem paths (at most a file's own name, such as ``adapter_config.json``).
"""

from __future__ import annotations

# The codes raised while reading an adapter from disk (``adapters.loader``).
ADAPTER_NOT_FOUND = "adapter_not_found"  # the directory does not exist: HTTP 400
INVALID_ADAPTER = "invalid_adapter"  # malformed or inconsistent files: HTTP 400
UNSUPPORTED_ADAPTER_FEATURE = "unsupported_adapter_feature"  # DoRA, bias, ...: HTTP 400
ADAPTER_RANK_TOO_LARGE = "adapter_rank_too_large"  # a rank above --max-lora-rank: HTTP 400
PICKLE_REFUSED = "pickle_refused"  # only adapter_model.bin / *.pt weights: HTTP 400
# Making adapters from loaded ones (``adapters.merge``, ``adapters.compose``).
INVALID_MERGE = "invalid_merge"  # a merge PEFT would refuse, or one we cannot serve: HTTP 400
INVALID_COMPOSITION = "invalid_composition"  # a composition that breaks a rule: HTTP 400
# Adapters fetched from a source URI (``adapters.sources``, ``adapters.source_cache``).
INVALID_ADAPTER_SOURCE = "invalid_adapter_source"  # a malformed URI: HTTP 400
UNKNOWN_ADAPTER_SOURCE = "unknown_adapter_source"  # no resolver for its scheme: HTTP 400
ADAPTER_FETCH_FAILED = "adapter_fetch_failed"  # the source failed, or sent no adapter: HTTP 400


class AdapterError(ValueError):
    """A refused adapter, or an adapter request that cannot be served.

    Attributes:
        code: a stable, machine-readable string (the constants above, or a registry code
            such as ``model_not_found``).
        message: a short human-readable explanation without server paths.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
