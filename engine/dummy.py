"""Serving a model from its ``config.json`` alone: random weights and a synthetic tokenizer.

``load_format="dummy"`` (vLLM's ``--load-format dummy``) benchmarks real architectures
without downloading a checkpoint: every weight is drawn on the target device, so a 7B base
starts in seconds and no float copy of it ever sits in host memory.

Semantics (weights):
    std = config.initializer_range, or 0.02 when the config has none
    RMSNorm weights (names ending in ``norm.weight``) = 1; 1-D parameters (biases) = 0;
    every other weight ~ N(0, std²), drawn from its own generator seeded by
    ``(seed, tensor name)``: the same seed gives the same weights whatever the load order,
    and an NF4 layer is ``quantize_nf4`` of exactly the float weight a float load draws
    (same device and dtype), drawn and quantized one layer at a time.

The synthetic tokenizer covers the vocabulary with the words ``t0`` .. ``t{n-1}``: text of
those words, split on whitespace, encodes to their ids, and ids decode to the words joined
with spaces, so prompts can be given as text or ids and the detokenizer works as usual.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from engine.model import Backends, CausalLM
from engine.packed import checkpoint_tensors
from engine.quantization import nf4_layer, quantize_nf4

logger = logging.getLogger(__name__)

DEFAULT_STD = 0.02  # transformers' initializer_range default
# Files any transformers tokenizer loads from; a directory with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tiktoken.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def init_std(config: PretrainedConfig) -> float:
    """The standard deviation of the random weights: the config's ``initializer_range``."""
    return float(getattr(config, "initializer_range", None) or DEFAULT_STD)


def _generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    """A generator for one tensor, seeded by the load's seed and the tensor's name."""
    tensor_seed = (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)
    return torch.Generator(device=device).manual_seed(tensor_seed)


def fill_dummy(t: torch.Tensor, name: str, std: float, seed: int) -> None:
    """Fill checkpoint tensor ``name`` in place (see `Semantics`)."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
    elif t.dim() == 1:
        t.zero_()
    else:
        t.normal_(0.0, std, generator=_generator(t.device, seed, name))


def dummy_tensors(
    model_dir: Path, std: float, seed: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor of a dummy load, whole and one at a time, exactly as
    :func:`init_dummy_weights` draws it on ``device`` in ``dtype`` (a tensor-parallel worker
    cuts each to its part, so a split dummy model is the one-device model)."""
    for name, shape in checkpoint_shapes(model_dir):
        tensor = torch.empty(shape, device=device, dtype=dtype)
        fill_dummy(tensor, name, std, seed)
        yield name, tensor


def init_dummy_weights(
    model: nn.Module,
    std: float,
    seed: int,
    nf4_modules: Collection[str] = (),
    dtype: torch.dtype | None = None,
) -> None:
    """Fill every parameter of the materialised ``model`` in place (see `Semantics`).

    Works on any module named like transformers' decoders (ours, or a transformers model for
    a baseline: the same seed, device and dtype give the same weights), by the checkpoint's
    names: each slice of a packed layer is drawn on its own. ``nf4_modules`` are the
    checkpoint names of NF4 layers (or slices), whose weight is drawn in ``dtype`` (default:
    the model's), then quantized and dropped, one at a time.
    """
    params = list(checkpoint_tensors(model))  # tied parameters once
    device = params[0][1].device if params else torch.device("cpu")
    dtype = dtype or (params[0][1].dtype if params else torch.float32)
    desc = "dummy weights" + (", quantizing to nf4" if nf4_modules else "")
    with torch.no_grad(), tqdm(total=len(params) + len(nf4_modules), desc=desc, leave=False) as bar:
        for name, param in params:
            fill_dummy(param, name, std, seed)
            bar.update()
        for module_name in nf4_modules:
            layer = nf4_layer(model, module_name)
            name = f"{module_name}.weight"
            weight = torch.empty(layer.out_features, layer.in_features, device=device, dtype=dtype)
            fill_dummy(weight, name, std, seed)
            layer.set_weight(quantize_nf4(weight))
            del weight  # never more than one float layer alive
            bar.update()


def checkpoint_shapes(model_dir: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor a checkpoint of ``model_dir/config.json`` holds
    (tied ones once), read from the model built on the meta device: nothing is allocated."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = CausalLM(config, Backends.select("torch", torch.device("cpu")))
    for name, param in checkpoint_tensors(model):
        yield name, tuple(param.shape)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds any file a tokenizer could be loaded from."""
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def _token_id(value: int | list[int] | None) -> int | None:
    """The first id of a config's ``*_token_id`` (Llama 3 instruct lists several EOS ids)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _special(token_id: int) -> AddedToken:
    """Word ``t{id}`` as a special token matched only as a whole word (``t1`` must not
    match inside ``t17``, as added tokens otherwise do)."""
    return AddedToken(f"t{token_id}", single_word=True, special=True, normalized=False)


def synthetic_tokenizer(config: PretrainedConfig) -> PreTrainedTokenizerFast:
    """A tokenizer of ``config.vocab_size`` words ``t0`` .. ``t{n-1}`` (see the module doc).

    EOS, BOS and padding are the words of the config's ids, registered as special tokens (so
    ``skip_special_tokens`` drops them); a word outside the vocabulary encodes as the padding
    token, or ``t0``. No BOS is prepended.
    """
    vocab_size = int(config.vocab_size)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    specials = {
        role: _special(token_id)
        for role in ("eos", "bos", "pad")
        if (token_id := _token_id(getattr(config, f"{role}_token_id", None))) is not None
        and 0 <= token_id < vocab_size
    }
    unk = specials.get("pad", _special(0))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk.content))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins the decoded words with single spaces.
    # (transformers 5's PreTrainedTokenizerFast.__init__ is untyped.)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token=unk,
        eos_token=specials.get("eos"),
        bos_token=specials.get("bos"),
        pad_token=specials.get("pad"),
        model_max_length=int(getattr(config, "max_position_embeddings", 2048)),
    )
