"""Merging adapters as PEFT's ``add_weighted_adapter`` does, and saving them as PEFT directories.

The adapters are real PEFT adapters on a tiny random Llama, of several ranks and target sets
(one with rsLoRA, one with rank/alpha patterns, one "all-linear", one restricted to layer 0).
The reference is PEFT itself: the same adapters loaded into one ``PeftModel`` and merged by
its own ``add_weighted_adapter`` with the same arguments.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_MERGE, AdapterError
from adapters.loader import load_lora_adapter
from adapters.merge import MIXTURE, MergeSpec, check_merge, merge_adapters
from adapters.merge_math import COMBINATION_TYPES
from adapters.peft_writer import save_peft_adapter
from adapters.weights import AdapterWeights, LoraModuleWeights
from tests.adapters.conftest import save_peft_adapter as save_with_peft
from tests.tiny_models import make_adapter, make_model

MAX_RANK = 64
PROMPT = torch.tensor([[1, 72, 101, 108, 108, 111]])

# make_adapter arguments: several ranks, overlapping but different target sets.
ADAPTERS: dict[str, dict[str, Any]] = {
    "a": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
    "b": {"r": 4, "alpha": 4, "targets": ["q_proj", "k_proj", "o_proj", "down_proj"]},
    "c": {"r": 4, "alpha": 6, "targets": ["q_proj", "v_proj", "up_proj"], "use_rslora": True},
    "d": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "gate_proj"]},
    "e": {
        "r": 4,
        "alpha": 8,
        "targets": ["v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"down_proj": 3},
    },
    "f": {"r": 2, "alpha": 2, "targets": "all-linear"},
}
SAME_RANK = (("a", "b", "c"), (0.7, -0.4, 1.1))  # for the types that need equal ranks
MIXED = (("d", "a", "e", "c", "f"), (0.6, 1.0, -0.5, 0.8, 0.3))
RSLORA_FIRST = (("c", "d"), (1.0, 0.5))

# id: (adapters, weights, add_weighted_adapter keyword arguments)
CASES: dict[str, tuple[tuple[str, ...], tuple[float, ...], dict[str, Any]]] = {
    "linear": (*SAME_RANK, {"combination_type": "linear"}),
    "ties": (*SAME_RANK, {"combination_type": "ties", "density": 0.5}),
    "ties_frequency": (
        *SAME_RANK,
        {"combination_type": "ties", "density": 0.7, "majority_sign_method": "frequency"},
    ),
    "magnitude_prune": (*SAME_RANK, {"combination_type": "magnitude_prune", "density": 0.6}),
    "dare_linear": (*SAME_RANK, {"combination_type": "dare_linear", "density": 1.0}),
    "dare_ties": (
        *SAME_RANK,
        {"combination_type": "dare_ties", "density": 1.0, "majority_sign_method": "frequency"},
    ),
    "cat": (*MIXED, {"combination_type": "cat"}),
    "svd": (*MIXED, {"combination_type": "svd"}),
    "svd_rank_clamp": (
        *MIXED,
        {"combination_type": "svd", "svd_rank": 6, "svd_clamp": 0.9, "svd_full_matrices": False},
    ),
    # k_proj and v_proj are 16 wide: PEFT returns 16 singular values, padded to 20 here.
    "svd_rank_above_width": (
        *MIXED,
        {"combination_type": "svd", "svd_rank": 20, "svd_full_matrices": False},
    ),
    "ties_svd": (*MIXED, {"combination_type": "ties_svd", "density": 0.5}),
    "magnitude_prune_svd": (*MIXED, {"combination_type": "magnitude_prune_svd", "density": 0.4}),
    "dare_linear_svd": (*MIXED, {"combination_type": "dare_linear_svd", "density": 1.0}),
    "dare_ties_svd": (*MIXED, {"combination_type": "dare_ties_svd", "density": 1.0}),
    # The first adapter's use_rslora makes PEFT scale the merged adapter by sqrt(r).
    "cat_rslora_first": (*RSLORA_FIRST, {"combination_type": "cat"}),
    "svd_rslora_first": (*RSLORA_FIRST, {"combination_type": "svd"}),
    "linear_rslora_first": (("c", "a"), (0.5, 2.0), {"combination_type": "linear"}),
    # One adapter: PEFT merges it linearly whatever the type (and needs no density).
    "single": (("d",), (-1.5,), {"combination_type": "ties"}),
    # The first adapter's layers_to_transform=[0] drops the others' layer-1 modules.
    "layer_filter_first": (("g", "a"), (1.0, 1.0), {"combination_type": "linear"}),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model directory ("base") and one directory per adapter."""
    root = tmp_path_factory.mktemp("merge")
    base = make_model(root / "base")
    dirs = {"base": base}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        dirs[name] = make_adapter(base, root / name, seed=seed, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_with_peft(
            _base(base), root / "g", seed=7, r=4, lora_alpha=4,
            target_modules=["q_proj"], layers_to_transform=[0],
        )  # fmt: skip
    dirs["g"] = root / "g"
    return dirs


@pytest.fixture(scope="module")
def ours(made: dict[str, Path], layout: BaseModelLayout) -> dict[str, AdapterWeights]:
    return {
        name: load_lora_adapter(path, layout, MAX_RANK)
        for name, path in made.items()
        if name != "base"
    }


@pytest.fixture(scope="module")
def reference(made: dict[str, Path]) -> PeftModel:
    """Every adapter loaded into one PEFT model, under its own name."""
    names = [name for name in made if name != "base"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base(made["base"]), made[names[0]], names[0])
        for name in names[1:]:
            model.load_adapter(made[name], adapter_name=name)
    return model


def _base(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _peft_merge(reference: PeftModel, name: str, case: str) -> None:
    adapters, weights, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        reference.add_weighted_adapter(list(adapters), list(weights), name, **kwargs)


def _our_merge(ours: dict[str, AdapterWeights], case: str, **extra: Any) -> AdapterWeights:
    adapters, weights, kwargs = CASES[case]
    spec = MergeSpec(adapters=adapters, weights=weights, **{**kwargs, **extra})
    return merge_adapters([ours[a] for a in adapters], spec, case)


def _peft_layers(model: PeftModel, adapter: str) -> dict[str, LoraLayer]:
    inner = model.base_model.model
    return {
        name: m
        for name, m in inner.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def _assert_matches_peft(
    merged: AdapterWeights, model: PeftModel, adapter: str, layout: BaseModelLayout
) -> None:
    """Same modules; same factors (non-SVD) or delta weights (SVD: signs are free)."""
    svd = merged.name in CASES and CASES[merged.name][2]["combination_type"].endswith("svd")
    peft_layers = _peft_layers(model, adapter)
    assert {layout.module_path(*key) for key in merged.modules} == set(peft_layers)
    for key, module in merged.modules.items():
        layer = peft_layers[layout.module_path(*key)]
        lora_a = layer.lora_A[adapter].weight.detach()
        lora_b = layer.lora_B[adapter].weight.detach()
        assert module.scaling == layer.scaling[adapter]
        assert module.rank == merged.config.r == layer.r[adapter]
        assert module.lora_a.dtype == module.lora_b.dtype == torch.float32
        if not svd:
            # PEFT keeps a narrower result unpadded (a rank_pattern); ours is zero-padded.
            rank = lora_a.shape[0]
            torch.testing.assert_close(module.lora_a[:rank], lora_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(module.lora_b[:, :rank], lora_b, atol=1e-5, rtol=0)
            assert not module.lora_a[rank:].any() and not module.lora_b[:, rank:].any()
        expected = layer.scaling[adapter] * (lora_b @ lora_a)
        torch.testing.assert_close(module.delta_weight(), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- agreement with PEFT


def test_every_peft_type_is_offered() -> None:
    assert set(COMBINATION_TYPES) == {
        "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
        "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
    }  # fmt: skip
    covered = {kw["combination_type"] for _, _, kw in CASES.values()}
    assert covered == set(COMBINATION_TYPES)


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_peft(
    case: str,
    ours: dict[str, AdapterWeights],
    reference: PeftModel,
    layout: BaseModelLayout,
) -> None:
    _peft_merge(reference, case, case)
    merged = _our_merge(ours, case)
    _assert_matches_peft(merged, reference, case, layout)
    assert merged.name == case
    config = merged.config
    assert (config.r, config.lora_alpha) == (merged.max_rank, merged.max_rank)
    assert config.use_rslora == ours[CASES[case][0][0]].config.use_rslora
    assert dict(config.rank_pattern) == dict(config.alpha_pattern) == {}


def test_merge_matches_peft_with_the_base_layout(
    ours: dict[str, AdapterWeights], reference: PeftModel, layout: BaseModelLayout
) -> None:
    # "f" is all-linear: with the real layout its expansion covers every base module.
    adapters, weights, kwargs = CASES["cat"]
    spec = MergeSpec(adapters=adapters, weights=weights, **kwargs)
    merged = merge_adapters([ours[a] for a in adapters], spec, "cat", layout=layout)
    _peft_merge(reference, "cat_with_layout", "cat")
    _assert_matches_peft(merged, reference, "cat_with_layout", layout)
    assert check_merge([ours[a] for a in adapters], spec, layout) == merged.config


def test_rslora_first_scales_by_sqrt_rank(ours: dict[str, AdapterWeights]) -> None:
    # PEFT's quirk, kept: the factors already carry each input's scaling, yet the merged
    # adapter is scaled by lora_alpha / sqrt(r) = sqrt(r) because the first input is rsLoRA.
    merged = _our_merge(ours, "cat_rslora_first")
    assert merged.config.use_rslora and merged.config.r == 12
    assert all(m.scaling == pytest.approx(12**0.5, rel=1e-15) for m in merged.modules.values())
    plain = _our_merge(ours, "cat")
    assert all(m.scaling == 1.0 for m in plain.modules.values())


def test_cat_is_exact_and_pads_missing_modules(ours: dict[str, AdapterWeights]) -> None:
    adapters, weights, _ = CASES["cat"]
    merged = _our_merge(ours, "cat")
    assert merged.config.r == sum(ours[a].config.max_rank for a in adapters)
    for key, module in merged.modules.items():
        expected = sum(
            w * ours[a].modules[key].delta_weight()
            for a, w in zip(adapters, weights, strict=True)
            if key in ours[a].modules
        )
        torch.testing.assert_close(module.delta_weight(), expected, atol=1e-5, rtol=0)


def test_merge_leaves_inputs_untouched(ours: dict[str, AdapterWeights]) -> None:
    before = {k: m.lora_a.clone() for k, m in ours["a"].modules.items()}
    _our_merge(ours, "ties")
    assert all(torch.equal(before[k], m.lora_a) for k, m in ours["a"].modules.items())


# ---------------------------------------------------------------- DARE


@pytest.mark.parametrize(
    ("dare", "plain"),
    [
        ("dare_linear", "linear"),
        ("dare_ties", "ties"),
        ("dare_linear_svd", "svd"),
        ("dare_ties_svd", "ties_svd"),
    ],
)
def test_dare_with_density_one_is_its_counterpart(
    dare: str, plain: str, ours: dict[str, AdapterWeights]
) -> None:
    adapters, weights = SAME_RANK
    specs = [
        MergeSpec(adapters, weights, combination_type=t, density=1.0, seed=5) for t in (dare, plain)
    ]
    merged = [merge_adapters([ours[a] for a in adapters], spec, "m") for spec in specs]
    for key, module in merged[0].modules.items():
        assert torch.equal(module.lora_a, merged[1].modules[key].lora_a)
        assert torch.equal(module.lora_b, merged[1].modules[key].lora_b)


def _kept_fraction(merged: AdapterWeights, keys: Iterable[tuple[int, str]]) -> float:
    kept = total = 0
    for key in keys:
        for tensor in (merged.modules[key].lora_a, merged.modules[key].lora_b):
            kept += int(tensor.count_nonzero())
            total += tensor.numel()
    return kept / total


def test_dare_keeps_about_density_and_rescales(
    ours: dict[str, AdapterWeights], reference: PeftModel, layout: BaseModelLayout
) -> None:
    # Weight 0 on "b" leaves only "a"'s task tensors: kept entries are sqrt(s)·A / density.
    density, adapters, weights = 0.3, ("a", "b"), (1.0, 0.0)
    spec = MergeSpec(adapters, weights, combination_type="dare_linear", density=density)
    merged = merge_adapters([ours["a"], ours["b"]], spec, "dare")
    assert abs(_kept_fraction(merged, ours["a"].modules) - density) < 0.04
    for key, source in ours["a"].modules.items():
        lora_a = merged.modules[key].lora_a
        kept = lora_a != 0
        expected = source.lora_a * source.scaling**0.5 / density
        torch.testing.assert_close(lora_a[kept], expected[kept], atol=1e-5, rtol=1e-5)
    # PEFT draws from the global RNG, so only the statistics can be compared.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_weighted_adapter(
            list(adapters), list(weights), "dare_peft", "dare_linear", density=density
        )
    layers = _peft_layers(reference, "dare_peft")
    peft_kept = total = 0
    for key in ours["a"].modules:
        layer = layers[layout.module_path(*key)]
        for tensor in (layer.lora_A["dare_peft"].weight, layer.lora_B["dare_peft"].weight):
            peft_kept += int(tensor.count_nonzero())
            total += tensor.numel()
    assert abs(peft_kept / total - density) < 0.04


def test_dare_is_reproducible_from_the_seed(ours: dict[str, AdapterWeights]) -> None:
    adapters, weights = SAME_RANK
    inputs = [ours[a] for a in adapters]

    def merged(seed: int) -> AdapterWeights:
        spec = MergeSpec(adapters, weights, combination_type="dare_ties", density=0.5, seed=seed)
        return merge_adapters(inputs, spec, "m")

    first, again, other = merged(7), merged(7), merged(8)
    assert first.modules.keys() == again.modules.keys() == other.modules.keys()
    assert all(torch.equal(m.lora_a, again.modules[k].lora_a) for k, m in first.modules.items())
    assert all(torch.equal(m.lora_b, again.modules[k].lora_b) for k, m in first.modules.items())
    assert not all(torch.equal(m.lora_a, other.modules[k].lora_a) for k, m in first.modules.items())
    assert all(torch.isfinite(m.lora_a).all() for m in first.modules.values())


# ---------------------------------------------------------------- saving as PEFT adapters


def _assert_same_adapter(saved: AdapterWeights, original: AdapterWeights) -> None:
    assert saved.modules.keys() == original.modules.keys()
    for key, module in original.modules.items():
        assert torch.equal(saved.modules[key].lora_a, module.lora_a)
        assert torch.equal(saved.modules[key].lora_b, module.lora_b)
        assert saved.modules[key].scaling == module.scaling


def _assert_peft_loads(directory: Path, original: AdapterWeights, base: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base(base), directory)
    layers = _peft_layers(model, "default")
    layout = _layout_for(original)
    assert set(layers) == {layout.module_path(*key) for key in original.modules}
    for key, module in original.modules.items():
        layer = layers[layout.module_path(*key)]
        assert torch.equal(layer.lora_A["default"].weight.detach(), module.lora_a)
        assert torch.equal(layer.lora_B["default"].weight.detach(), module.lora_b)
        assert layer.scaling["default"] == module.scaling
    return model


def _layout_for(adapter: AdapterWeights) -> BaseModelLayout:
    shapes = {t: (m.lora_a.shape[1], m.lora_b.shape[0]) for (_, t), m in adapter.modules.items()}
    return BaseModelLayout(num_layers=2, linear_shapes=shapes)


@pytest.mark.parametrize(
    "case", ["linear", "cat", "svd", "ties", "cat_rslora_first", "layer_filter_first"]
)
def test_saved_merge_loads_back(
    case: str,
    ours: dict[str, AdapterWeights],
    made: dict[str, Path],
    layout: BaseModelLayout,
    tmp_path: Path,
) -> None:
    merged = _our_merge(ours, case)
    directory = save_peft_adapter(merged, tmp_path / case, base_model_name_or_path="tiny")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny"
    assert not list(directory.glob(".*"))  # no temporary files left
    _assert_same_adapter(load_lora_adapter(directory, layout, MAX_RANK), merged)
    _assert_peft_loads(directory, merged, made["base"])


@pytest.mark.parametrize("case", ["linear", "cat", "ties"])
def test_saved_merge_generates_like_peft(
    case: str,
    ours: dict[str, AdapterWeights],
    made: dict[str, Path],
    reference: PeftModel,
    tmp_path: Path,
) -> None:
    name = f"{case}_generate"
    _peft_merge(reference, name, case)
    directory = save_peft_adapter(_our_merge(ours, case), tmp_path / case)
    loaded = _assert_peft_loads(directory, _our_merge(ours, case), made["base"])
    reference.set_adapter(name)
    with torch.no_grad():
        expected = reference.generate(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
        got = loaded.generate(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
        with reference.disable_adapter():
            plain = reference.generate(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the adapter is visible in the output


def test_saved_adapter_keeps_patterns(
    ours: dict[str, AdapterWeights],
    made: dict[str, Path],
    layout: BaseModelLayout,
    tmp_path: Path,
) -> None:
    # A loaded adapter with rank and alpha patterns is written with those patterns.
    directory = save_peft_adapter(ours["e"], tmp_path / "e")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2}
    assert config["alpha_pattern"] == {"down_proj": 3}
    _assert_same_adapter(load_lora_adapter(directory, layout, MAX_RANK), ours["e"])
    _assert_peft_loads(directory, ours["e"], made["base"])


def test_saved_adapter_with_per_module_ranks(
    ours: dict[str, AdapterWeights],
    made: dict[str, Path],
    layout: BaseModelLayout,
    tmp_path: Path,
) -> None:
    # Modules whose rank and scaling the config does not explain get full-path patterns.
    source = ours["a"]
    generator = torch.Generator().manual_seed(0)
    modules = dict(source.modules)
    # Scalings a PEFT config can give (alpha / rank); 0.7 itself is no float divided by 3.
    for key, rank, scaling in [((0, "q_proj"), 3, 2.1 / 3), ((1, "down_proj"), 4, 1.3)]:
        m = modules[key]
        modules[key] = LoraModuleWeights(
            lora_a=torch.randn(rank, m.lora_a.shape[1], generator=generator),
            lora_b=torch.randn(m.lora_b.shape[0], rank, generator=generator),
            scaling=scaling,
        )
    odd = dataclasses.replace(source, modules=modules)
    directory = save_peft_adapter(odd, tmp_path / "odd")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3}
    assert set(config["alpha_pattern"]) == {
        r"model\.layers\.0\.self_attn\.q_proj",
        r"model\.layers\.1\.mlp\.down_proj",
    }
    _assert_same_adapter(load_lora_adapter(directory, layout, MAX_RANK), odd)
    _assert_peft_loads(directory, odd, made["base"])


def test_save_refuses_a_config_that_misdescribes_the_modules(
    ours: dict[str, AdapterWeights], tmp_path: Path
) -> None:
    modules = {k: m for k, m in ours["a"].modules.items() if k != (1, "v_proj")}
    broken = dataclasses.replace(ours["a"], modules=modules)
    with pytest.raises(ValueError, match="config selects 6 modules but it has 5"):
        save_peft_adapter(broken, tmp_path / "broken")


# ---------------------------------------------------------------- refusals


SPEC_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown_type": ({"combination_type": "average"}, "unknown combination_type 'average'"),
    "no_adapters": ({"adapters": (), "weights": ()}, "adapters is empty"),
    "blank_name": ({"adapters": ("a", "")}, r"adapters\[1\] must be a non-empty adapter name"),
    "weight_count": ({"weights": (1.0,)}, "got 1 weights for 2 adapters"),
    "nan_weight": ({"weights": (1.0, float("nan"))}, r"weights\[1\] must be a finite number"),
    "inf_weight": ({"weights": (float("inf"), 1.0)}, r"weights\[0\] must be a finite number"),
    "bool_weight": ({"weights": (True, 1.0)}, r"weights\[0\] must be a finite number"),
    "density_missing": ({"combination_type": "ties"}, r"density must be in \(0, 1\]"),
    "density_zero": (
        {"combination_type": "dare_linear", "density": 0.0},
        r"density must be in \(0, 1\] for combination_type 'dare_linear'",
    ),
    "density_above_one": (
        {"combination_type": "magnitude_prune_svd", "density": 1.5},
        r"density must be in \(0, 1\]",
    ),
    "density_negative": ({"combination_type": "ties_svd", "density": -0.1}, r"\(0, 1\]"),
    "density_nan": ({"density": float("nan")}, "density must be a finite number"),
    "majority_sign": (
        {"combination_type": "ties", "density": 0.5, "majority_sign_method": "median"},
        "majority_sign_method must be 'total' or 'frequency'",
    ),
    "svd_rank_zero": ({"svd_rank": 0}, "svd_rank must be a positive integer"),
    "svd_rank_float": ({"svd_rank": 2.5}, "svd_rank must be a positive integer"),
    "svd_clamp": ({"svd_clamp": 1.5}, r"svd_clamp must be a quantile in \[0, 1\]"),
    "svd_full_matrices": ({"svd_full_matrices": "yes"}, "svd_full_matrices must be true or false"),
    "svd_driver_unknown": ({"svd_driver": "lapack"}, "svd_driver must be one of"),
    "svd_driver_on_cpu": ({"svd_driver": "gesvdj"}, "accepts only for CUDA tensors"),
    "seed_type": ({"seed": "7"}, "seed must be an integer"),
    "seed_range": ({"seed": 2**64}, "seed must fit in 64 bits"),
}


@pytest.mark.parametrize("case", SPEC_REFUSALS)
def test_spec_refusals(case: str) -> None:
    changes, message = SPEC_REFUSALS[case]
    fields = {"adapters": ("a", "b"), "weights": (1.0, 1.0), **changes}
    with pytest.raises(AdapterError, match=message) as info:
        MergeSpec(**fields)
    assert info.value.code == INVALID_MERGE


def test_spec_follows_peft_on_ignored_fields() -> None:
    # Only the types that use an option check it, as in PEFT; one adapter is always linear.
    MergeSpec(("a", "b"), (1, 2), combination_type="linear", density=5.0, svd_driver="gesvd")
    MergeSpec(("a",), (1.0,), combination_type="ties")  # linear: no density needed
    spec = MergeSpec(["a", "b"], [1, 2], combination_type=MIXTURE)  # validated, routed elsewhere
    assert spec.adapters == ("a", "b") and spec.weights == (1, 2)


def _refuse(adapters: list[AdapterWeights], spec: MergeSpec, message: str, **kw: Any) -> None:
    """Both the cheap check and the merge itself refuse, with the same message."""
    for call in (
        lambda: check_merge(adapters, spec, **kw),
        lambda: merge_adapters(adapters, spec, "m", **kw),
    ):
        with pytest.raises(AdapterError, match=message) as info:
            call()
        assert info.value.code == INVALID_MERGE


def test_mixture_is_not_merged(ours: dict[str, AdapterWeights]) -> None:
    spec = MergeSpec(("a", "b"), (1.0, 1.0), combination_type=MIXTURE)
    _refuse([ours["a"], ours["b"]], spec, "'mixture' is not a weight merge")


def test_adapter_count_must_match_spec(ours: dict[str, AdapterWeights]) -> None:
    spec = MergeSpec(("a", "b"), (1.0, 1.0), combination_type="cat")
    _refuse([ours["a"]], spec, "got 1 adapters for a MergeSpec naming 2")


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_equal_rank_types_need_equal_r(
    combination_type: str, ours: dict[str, AdapterWeights], reference: PeftModel
) -> None:
    spec = MergeSpec(("a", "d"), (1.0, 1.0), combination_type=combination_type, density=0.5)
    _refuse([ours["a"], ours["d"]], spec, "all adapters must have the same r value")
    with pytest.raises(ValueError, match="same r value"):  # PEFT's own rule
        reference.add_weighted_adapter(["a", "d"], [1, 1], "never", combination_type, density=0.5)


def test_equal_rank_types_need_equal_module_ranks(
    ours: dict[str, AdapterWeights], reference: PeftModel
) -> None:
    # "e" has r=4 but v_proj rank 2 (rank_pattern): PEFT's r check passes, then stacking the
    # factors fails; here it is refused up front, naming the module.
    spec = MergeSpec(("a", "e"), (1.0, 1.0), combination_type="linear")
    _refuse([ours["a"], ours["e"]], spec, "same rank at every module.*v_proj has rank 4")
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        reference.add_weighted_adapter(["a", "e"], [1, 1], "never_e", "linear")


def test_target_module_types_must_agree(ours: dict[str, AdapterWeights]) -> None:
    config = dataclasses.replace(ours["a"].config, target_modules=r".*\.(q|v)_proj|.*down_proj")
    regex = dataclasses.replace(ours["a"], name="regex", config=config)
    spec = MergeSpec(("regex", "b"), (1.0, 1.0), combination_type="cat")
    _refuse([regex, ours["b"]], spec, "same target modules type")
    both = merge_adapters([regex, regex], spec, "m")  # two regexes: joined with |
    assert both.config.target_modules == f"({config.target_modules})|({config.target_modules})"


def test_base_shapes_must_agree(ours: dict[str, AdapterWeights], layout: BaseModelLayout) -> None:
    narrow = LoraModuleWeights(torch.ones(4, 32), torch.ones(64, 4), 1.0)
    other = dataclasses.replace(ours["a"], name="other", modules={(0, "q_proj"): narrow})
    spec = MergeSpec(("a", "other"), (1.0, 1.0), combination_type="cat")
    _refuse([ours["a"], other], spec, "'other' and 'a' disagree on the shape of q_proj")
    _refuse([other, ours["a"]], spec, "disagree on the shape of q_proj", layout=layout)
    small = BaseModelLayout(num_layers=1, linear_shapes=dict(layout.linear_shapes))
    _refuse([ours["a"], ours["b"]], spec, "does not fit the base model", layout=small)


def test_merged_module_without_inputs(ours: dict[str, AdapterWeights]) -> None:
    # "d" restricted to layer 0: the merged config (the union of targets, with "a"'s layer
    # filters: none) selects layer 1's gate_proj, which no input has. PEFT raises "No
    # matching LoRAs found" there.
    d = ours["d"]
    layer0 = dataclasses.replace(
        d,
        config=dataclasses.replace(d.config, layers_to_transform=(0,)),
        modules={k: m for k, m in d.modules.items() if k[0] == 0},
    )
    spec = MergeSpec(("a", "d0"), (1.0, 1.0), combination_type="svd")
    _refuse([ours["a"], layer0], spec, "targets model.layers.1.mlp.gate_proj.*no adapter")
