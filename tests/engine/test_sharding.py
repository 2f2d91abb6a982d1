"""A worker's part of the weights (no processes: the cuts alone).

An NF4 part dequantizes to exactly the same values as the whole weight's elements; the
workers' parts of a model, as the loader cuts them, put back together are the one-device
model (float, NF4, dummy weights); the parts of an adapter's matrices put back together are
the matrices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.placement import Placement, TargetPlacement
from engine.loader import load_model
from engine.model import Backends
from engine.packed import checkpoint_tensors
from engine.parallel.group import Collectives, Shard
from engine.parallel.sharding import shard_nf4, shard_placement
from engine.quantization import NF4Linear, quantize_nf4
from kernels.nf4 import NF4Weight, dequantize_nf4
from tests.engine.test_tensor_parallel import SHAPE
from tests.tiny_models import make_model

CPU = torch.device("cpu")


class Part(Collectives):
    """A worker's collectives for loading only (nothing is communicated)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard


def backends(shard: Shard) -> Backends:
    single = Backends.select("torch", CPU)
    return Backends(single.attention, single.lora, single.nf4, Part(shard))


def test_an_nf4_part_dequantizes_to_the_whole_weights_elements() -> None:
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(96, 256))  # 384 blocks: two nested groups, one partial
    whole = dequantize_nf4(weight)
    for rows, cols in (
        (slice(48, 96), None),
        (None, slice(128, 256)),
        (slice(0, 5), slice(64, 192)),
    ):
        part = shard_nf4(weight, rows=rows, cols=cols)
        expected = whole[rows or slice(None), cols or slice(None)]
        assert torch.equal(dequantize_nf4(part), expected)
    with pytest.raises(ValueError, match="whole 64-value blocks"):
        shard_nf4(weight, cols=slice(0, 96))


@pytest.mark.parametrize(
    ("load_format", "quantization"), [("auto", "none"), ("auto", "nf4"), ("dummy", "nf4")]
)
def test_the_workers_parts_put_together_are_the_one_device_model(
    tmp_path: Path, load_format: str, quantization: str
) -> None:
    """Each worker's part, as the loader cuts it (from the checkpoint, or drawn whole as a
    dummy load draws it), put back together, is the model one device loads."""
    base = make_model(tmp_path / "base", "qwen2", vocab_size=321, **SHAPE)
    args = (quantization, load_format, 7)
    whole = load_model(base, torch.float32, CPU, Backends.select("torch", CPU), *args)
    parts = [load_model(base, torch.float32, CPU, backends(Shard(r, 2)), *args) for r in (0, 1)]
    tensors = [dict(checkpoint_tensors(m)) for m in (whole, *parts)]
    for name, expected in tensors[0].items():
        leaf, kind = name.rsplit(".", 2)[-2:]
        got = [t[name] for t in tensors[1:]]
        if leaf in ("embed_tokens", "lm_head"):  # 161 rows each, the last padded with zeros
            assert torch.equal(torch.cat(got)[:321], expected) and not got[1][-1].any()
        elif leaf in ("o_proj", "down_proj") and kind == "weight":
            assert torch.equal(torch.cat(got, dim=1), expected), name
        elif leaf in ("o_proj", "down_proj"):  # a bias: added once, after the all-reduce
            assert torch.equal(got[0], expected) and not got[1].any(), name
        elif leaf.endswith("_proj"):  # q, k, v, gate, up: their rows
            assert torch.equal(torch.cat(got), expected), name
        else:  # norms
            assert all(torch.equal(g, expected) for g in got), name
    nf4 = [name for name, m in whole.named_modules() if isinstance(m, NF4Linear)]
    assert bool(nf4) == (quantization == "nf4")
    for module in nf4:
        whole_weight = dequantize_nf4(_weight(whole, module))
        got = [dequantize_nf4(_weight(part, module)) for part in parts]
        dim = 1 if module.endswith(("o_proj", "down_proj")) else 0
        assert torch.equal(torch.cat(got, dim=dim), whole_weight), module


def _weight(model: torch.nn.Module, module: str) -> NF4Weight:
    layer = model.get_submodule(module)
    assert isinstance(layer, NF4Linear) and layer.weight is not None
    return layer.weight


def test_an_adapters_parts_put_together_are_the_adapter() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(4, 128), torch.randn(64, 4)
    pages = torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 1, dtype=torch.int32)
    target = TargetPlacement("q_proj", *pages, (a, None), (b, None), 128, 64)
    placement = Placement(
        adapter_id=1, slot=0, targets=(target,), ranks=torch.zeros(2, 7, dtype=torch.int32),
        scalings=torch.zeros(2, 7),
    )  # fmt: skip
    parts = [shard_placement(placement, Shard(r, 2)).targets[0] for r in range(2)]
    assert all((p.in_features, p.out_features) == (64, 32) for p in parts)
    assert torch.equal(torch.cat([p.lora_a[0] for p in parts], dim=1), a)
    assert torch.equal(torch.cat([p.lora_b[0] for p in parts], dim=0), b)
    assert all(p.lora_a[1] is None and p.a_pages is target.a_pages for p in parts)
