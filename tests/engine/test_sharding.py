"""A worker's part of the weights (no processes: the cuts alone).

An NF4 part dequantizes to exactly the same values as the whole weight's elements; the
loader's cut of each tensor as it streams in gives the same part as cutting the whole loaded
model; the parts of an adapter's matrices put back together are the matrices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.placement import Placement, TargetPlacement
from engine.loader import load_model
from engine.model import Backends
from engine.parallel import Collectives, Shard
from engine.quantization import quantize_nf4
from engine.sharding import shard_model, shard_nf4, shard_placement
from kernels.nf4 import dequantize_nf4
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


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_the_loaders_cut_equals_cutting_the_whole_model(tmp_path: Path, quantization: str) -> None:
    base = make_model(tmp_path / "base", "qwen2", vocab_size=321, **SHAPE)
    whole = load_model(base, torch.float32, CPU, Backends.select("torch", CPU), quantization)
    for rank in range(2):
        shard = Shard(rank, 2)
        streamed = load_model(base, torch.float32, CPU, backends(shard), quantization)
        cut = load_model(base, torch.float32, CPU, backends(shard), quantization)
        shard_model(whole, cut, shard)
        streamed_params, cut_params = (
            dict(streamed.named_parameters()),
            dict(cut.named_parameters()),
        )
        assert streamed_params.keys() == cut_params.keys()
        for name, param in streamed_params.items():
            assert torch.equal(param, cut_params[name]), name
        nf4 = {n: m for n, m in streamed.named_modules() if getattr(m, "weight", None) is not None
               and not isinstance(m.weight, torch.Tensor)}  # fmt: skip
        assert bool(nf4) == (quantization == "nf4")
        for name, module in nf4.items():
            other = cut.get_submodule(name).weight
            assert torch.equal(dequantize_nf4(module.weight), dequantize_nf4(other)), name
        # The vocabulary's 321 rows: 161 on each worker, the last one padded with zeros.
        assert streamed.model.embed_tokens.weight.shape[0] == 161
        if rank == 1:
            assert not streamed.lm_head.weight[-1].any()


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
