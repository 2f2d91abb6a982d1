"""A PEFT LoRA adapter's ``adapter_config.json``, parsed as plain JSON and validated.

The file is never handed to peft or transformers (no ``PeftConfig.from_pretrained``, no remote
code): it is a JSON object read with :mod:`json`, checked field by field against what
PEFT 0.21's ``LoraConfig`` accepts. Anything that would change the math in a way the engine
does not implement (DoRA, biases, ``modules_to_save``, other LoRA variants, inits that rewrite
the base weights, fields from a newer PEFT) is refused with a message naming it, never ignored.
What the config means for each module (targets, rank, scaling) is :mod:`adapters.peft_targets`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
# The regexes PEFT builds around rank/alpha_pattern keys and layers_pattern ("{}"); used by
# adapters.peft_targets, and compiled here so a bad pattern is refused when the file is read.
PATTERN_KEY_TEMPLATE = r"(.*\.)?({})$"
LAYERS_PATTERN_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."

# LoraConfig fields (peft 0.21) that do not change what the served adapter computes.
# init_lora_weights is checked separately: some inits rewrite the base weights.
_HARMLESS_FIELDS = frozenset(
    {
        "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
        "lora_dropout", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "qalora_group_size", "runtime_config",
        "init_lora_weights",
    }
)  # fmt: skip

# LoraConfig fields for LoRA variants and extras the engine does not serve: refused when set.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable_token_indices",
    "megatron_config": "megatron_config",
}

# init_lora_weights values whose adapter is trained against a rewritten base (W - B·A, or a
# quantized residual), so it is wrong on the original base unless PEFT converted it on save
# (which rewrites init_lora_weights to true).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")  # and true / false


def _invalid(message: str) -> AdapterError:
    return AdapterError(INVALID_ADAPTER, f"adapter_config.json: {message}")


def _unsupported(feature: str) -> AdapterError:
    return AdapterError(
        UNSUPPORTED_ADAPTER_FEATURE, f"adapter_config.json: {feature} is not supported"
    )


def _brief(value: object) -> str:
    """The repr of a value from the file, cut short: messages stay bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _check_regex(name: str, pattern: str, template: str = "{}") -> None:
    """Compile ``pattern`` inside the larger regex PEFT embeds it in (``template``)."""
    # Patterns come from the adapter's author, as in PEFT; only admins load adapters.
    try:
        re.compile(template.replace("{}", pattern))
    except re.error as e:
        raise _invalid(
            f"{name} {_brief(pattern)} is not a valid regular expression ({e})"
        ) from None


def _str_or_strs(name: str, value: object) -> str | tuple[str, ...] | None:
    """A JSON string, or list of strings, as str / tuple; null stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _invalid(f"{name} must be a string or a list of strings")


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of ``adapter_config.json`` that decide what a LoRA adapter computes.

    Attributes:
        r: the default rank of every adapted module.
        lora_alpha: the default alpha; a module's scaling is ``alpha / r`` (or
            ``alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: module names (tuple), a regex (str) that must match a whole module
            path, or ``"all-linear"``.
        use_rslora: rank-stabilized scaling.
        rank_pattern: module-path regex to rank, first match in file order wins.
        alpha_pattern: module-path regex to alpha, likewise.
        fan_in_fan_out: must be false for ``nn.Linear``; PEFT warns and uses false, as here.
        layers_to_transform: layer indices (or one index) that name-list targets apply to.
        layers_pattern: the name(s) of the module list holding the layers (``"layers"``).
        exclude_modules: names or a regex of modules never adapted.
        bias: only ``"none"`` is served.
        use_dora: DoRA (`adapters/loader.py` reads its magnitudes).
        modules_to_save: only empty is served.
        ensure_weight_tying: on a base whose lm_head is tied to embed_tokens, lm_head's LoRA
            is the embedding's, transposed (`adapters/embed_head.py`).
        peft_type: ``"LORA"``.
        base_model_name_or_path: informational; the server decides the base model.
    """

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    bias: str = "none"
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    ensure_weight_tying: bool = False
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.peft_type != "LORA":
            raise _invalid(
                f"peft_type is {_brief(self.peft_type)}; only 'LORA' adapters are served"
            )
        if not _is_int(self.r) or self.r <= 0:
            raise _invalid(f"r must be a positive integer, got {_brief(self.r)}")
        if not _is_number(self.lora_alpha):
            raise _invalid(f"lora_alpha must be a finite number, got {_brief(self.lora_alpha)}")
        self._check_targeting()
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern key", key, PATTERN_KEY_TEMPLATE)
            if not _is_int(rank) or rank <= 0:
                raise _invalid(
                    f"rank_pattern[{_brief(key)}] must be a positive integer, got {_brief(rank)}"
                )
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", key, PATTERN_KEY_TEMPLATE)
            if not _is_number(alpha):
                raise _invalid(
                    f"alpha_pattern[{_brief(key)}] must be a finite number, got {_brief(alpha)}"
                )
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(f"{name} must be true or false")
        if not isinstance(self.base_model_name_or_path, (str, type(None))):
            raise _invalid("base_model_name_or_path must be a string")
        if self.modules_to_save:
            raise _unsupported(f"modules_to_save {_brief(list(self.modules_to_save))}")
        if self.bias in ("all", "lora_only"):
            raise _unsupported(f"bias {self.bias!r} (trained biases)")
        if self.bias != "none":
            raise _invalid(f"bias must be 'none', 'all' or 'lora_only', got {_brief(self.bias)}")
        if self.fan_in_fan_out:
            # peft.tuners.lora.layer.Linear: "fan_in_fan_out is set to True but the target
            # module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
            logger.warning("adapter_config.json: fan_in_fan_out is true for nn.Linear; using false")
        # Read-only views: the loader validates weights against this config once.
        object.__setattr__(self, "rank_pattern", MappingProxyType(dict(self.rank_pattern)))
        object.__setattr__(self, "alpha_pattern", MappingProxyType(dict(self.alpha_pattern)))

    def _check_targeting(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets.lower() != ALL_LINEAR:
                _check_regex("target_modules", targets)
            # LoraConfig.__post_init__ raises for both of these.
            if self.layers_to_transform is not None:
                raise _invalid("layers_to_transform cannot be used when target_modules is a str")
            if self.layers_pattern is not None:
                raise _invalid("layers_pattern cannot be used when target_modules is a str")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise _invalid("target_modules must be a non-empty list of module names or a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise _invalid("layers_pattern needs layers_to_transform")
        layers = self.layers_to_transform
        if layers is not None and not (
            _is_int(layers) or (isinstance(layers, tuple) and all(_is_int(i) for i in layers))
        ):
            raise _invalid("layers_to_transform must be an integer or a list of integers")
        for pattern in _as_tuple(self.layers_pattern):
            _check_regex("layers_pattern", pattern, LAYERS_PATTERN_TEMPLATE)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)

    @classmethod
    def from_json(cls, text: str | bytes) -> LoraAdapterConfig:
        """Parse and validate the text of ``adapter_config.json``.

        Raises:
            AdapterError: ``invalid_adapter`` for malformed JSON or values,
                ``unsupported_adapter_feature`` for what the engine does not serve.
        """
        return cls.from_dict(parse_json_object(text))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoraAdapterConfig:
        """Validate a parsed ``adapter_config.json`` object (see :meth:`from_json`)."""
        for name in ("r", "lora_alpha", "target_modules"):
            if raw.get(name) is None:
                raise _invalid(f"missing {name!r}")
        for name, feature in _UNSUPPORTED_FIELDS.items():
            value = raw.get(name)
            # A sub-config, even {}, turns its variant on (PEFT builds it with defaults).
            if value or isinstance(value, dict):
                raise _unsupported(feature)
        _check_init(raw.get("init_lora_weights", True))
        known = {f for f in cls.__dataclass_fields__} | _HARMLESS_FIELDS | set(_UNSUPPORTED_FIELDS)
        for name, value in raw.items():
            # A field from a newer PEFT may change the math: refuse it unless it is unset.
            if name not in known and value not in (None, False, [], {}, ""):
                raise _unsupported(f"unknown field {_brief(name)}")
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            value = raw.get(name) or {}
            if not isinstance(value, dict):
                raise _invalid(f"{name} must be an object")
            patterns[name] = value
        layers = raw.get("layers_to_transform")
        modules_to_save = _str_or_strs("modules_to_save", raw.get("modules_to_save"))
        return cls(
            r=raw["r"],
            lora_alpha=raw["lora_alpha"],
            target_modules=_str_or_strs("target_modules", raw["target_modules"]) or (),
            use_rslora=_or_default(raw, "use_rslora", False),
            rank_pattern=patterns["rank_pattern"],
            alpha_pattern=patterns["alpha_pattern"],
            fan_in_fan_out=_or_default(raw, "fan_in_fan_out", False),
            layers_to_transform=tuple(layers) if isinstance(layers, list) else layers,
            layers_pattern=_str_or_strs("layers_pattern", raw.get("layers_pattern")),
            exclude_modules=_str_or_strs("exclude_modules", raw.get("exclude_modules")),
            bias=_or_default(raw, "bias", "none"),
            use_dora=_or_default(raw, "use_dora", False),
            modules_to_save=(modules_to_save,)
            if isinstance(modules_to_save, str)
            else modules_to_save,
            ensure_weight_tying=_or_default(raw, "ensure_weight_tying", False),
            peft_type=_or_default(raw, "peft_type", "LORA"),  # LoraConfig's own default
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )

    @property
    def max_rank(self) -> int:
        """The largest rank the config can give a module (PEFT's own bound)."""
        return max([self.r, *self.rank_pattern.values()])


def parse_json_object(text: str | bytes) -> dict[str, Any]:
    """``adapter_config.json``'s text as a JSON object (NaN and Infinity refused).

    Raises:
        AdapterError: ``invalid_adapter`` for malformed JSON or anything but an object.
    """

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        raw = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _invalid(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _invalid("must be a JSON object")
    return raw


def _or_default(raw: Mapping[str, Any], name: str, default: Any) -> Any:
    value = raw.get(name)
    return default if value is None else value


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


def _check_init(init: object) -> None:
    """Refuse inits that rewrite the base weights; the rest only seed training."""
    if isinstance(init, bool) or init is None:
        return
    if isinstance(init, str):
        lowered = init.lower()
        if lowered.startswith(_BASE_REWRITING_INITS):
            raise _unsupported(
                f"init_lora_weights={_brief(init)} (the adapter expects a rewritten base model; "
                "save it with path_initial_model_for_weight_conversion)"
            )
        if lowered in _PLAIN_INITS:
            return
    raise _unsupported(f"init_lora_weights={_brief(init)}")
