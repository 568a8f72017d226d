"""Spectra of LoRA updates: equal to torch.linalg.svdvals of PEFT's own dense ΔW (get_delta_weight), from live
models and from saved adapter folders; energy figures and rank advice on constructed spectra."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from studio.core.adapters.spectrum import (
    RankAdvice,
    advise_ranks,
    compute_spectra,
    energy_share,
    read_adapter_spectra,
    spectrum_from_values,
)
from studio.core.errors import ExportError

RANK_PATTERN = {"q_proj": 4, "model.layers.1.mlp.down_proj": 12}
ALPHA_PATTERN = {"v_proj": 3.0, "model.layers.2.mlp.up_proj": 40.0}


def dense_values(peft_model) -> dict[str, torch.Tensor]:
    """The reference: singular values of the ΔW that PEFT itself merges, per base-model module name."""
    with torch.no_grad():
        return {
            name: torch.linalg.svdvals(layer.get_delta_weight("default").flatten(1))
            for name, layer in peft_model.get_base_model().named_modules()
            if isinstance(layer, LoraLayer)
        }


def assert_matches_dense(spectra, dense) -> None:
    assert [s.name for s in spectra] == list(dense)
    for s in spectra:
        reference = dense[s.name]
        top = reference[0].item()
        assert top > 0
        assert len(s.values) == s.rank
        got = torch.tensor(s.values, dtype=reference.dtype)
        torch.testing.assert_close(got, reference[: s.rank], rtol=1e-4, atol=1e-4 * top)
        # ΔW has rank at most r: every further dense value is float noise
        assert reference[s.rank :].max().item() < 1e-4 * top


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=32, vocab_size=96)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_linear_spectra_equal_dense_svdvals_with_rank_and_alpha_overrides(tiny_llama, variant):
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
        rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN,
        use_rslora=variant == "rslora", use_dora=variant == "dora",
    )
    model = get_peft_model(tiny_llama, config)

    spectra = compute_spectra(model)

    assert len(spectra) == 3 * 7
    ranks = {s.name: s.rank for s in spectra}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.mlp.down_proj"] == 12
    assert ranks["model.layers.0.mlp.down_proj"] == 8
    assert_matches_dense(spectra, dense_values(model))


def test_conv1d_spectra_equal_dense_svdvals():
    config = LoraConfig(
        r=6, lora_alpha=9, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False, rank_pattern={"c_fc": 3}, alpha_pattern={"h.1.attn.c_proj": 20.0},
    )
    model = get_peft_model(tiny_gpt2(), config)

    spectra = compute_spectra(model)

    assert [s.name for s in spectra][:3] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                             "transformer.h.0.mlp.c_fc"]
    assert {s.rank for s in spectra if s.name.endswith("c_fc")} == {3}
    assert_matches_dense(spectra, dense_values(model))


def test_conv2d_spectra_equal_dense_svdvals():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(net, config)

    spectra = compute_spectra(model)

    assert [s.name for s in spectra] == ["0", "2"]
    assert_matches_dense(spectra, dense_values(model))


def test_embedding_spectra_equal_dense_svdvals_from_every_wrapper(tiny_llama):
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
                        rank_pattern={"embed_tokens": 5})
    model = get_peft_model(tiny_llama, config)

    spectra = compute_spectra(model)

    assert spectra[0].name == "model.embed_tokens" and spectra[0].rank == 5
    assert_matches_dense(spectra, dense_values(model))
    # the PeftModel, its LoraModel and the wrapped base model name the same modules with the same values
    assert compute_spectra(model.base_model) == spectra
    assert compute_spectra(model.get_base_model(), adapter="default") == spectra
    assert compute_spectra(model, adapter="no-such-adapter") == ()


def test_graded_spectrum_over_five_decades_keeps_its_small_values(tiny_llama):
    """ΔW = scaling·U·diag(s)·Vᵀ with s from 1 down to 1e-5: the QR route keeps every value within 1e-7 of the
    top one, so the tail of a log plot is real (a float32 Gram-matrix shortcut is off by 5e-5 of it here)."""
    model = get_peft_model(tiny_llama, LoraConfig(r=8, lora_alpha=4, target_modules=["model.layers.0.mlp.gate_proj"]))
    layer = model.get_base_model().model.layers[0].mlp.gate_proj
    torch.manual_seed(1)
    s = torch.logspace(0, -5, 8, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(128, 8, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64)).Q
    mix = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q  # B·A is unchanged by B·M, Mᵀ·A
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(u * s @ mix)
        layer.lora_A["default"].weight.copy_(mix.T @ v.T)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = torch.linalg.svdvals(layer.scaling["default"] * b @ a)[:8]  # float64, of the float32 factors as stored

    (spectrum,) = compute_spectra(model)

    assert exact[-1] < 2e-5 * exact[0]  # storing the factors in float32 moved the values, not the grading
    got = torch.tensor(spectrum.values, dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-7 * exact[0].item())


def test_rank_one_adapter_has_one_nonzero_singular_value(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=1, lora_alpha=4, target_modules=["o_proj"],
                                                  init_lora_weights=False))

    spectra = compute_spectra(model)
    dense = dense_values(model)

    assert len(spectra) == 3
    for s in spectra:
        assert len(s.values) == 1 and s.values[0] > 0
        assert (s.effective_rank_90, s.effective_rank_95, s.top1_energy) == (1, 1, 1.0)
        assert s.values[0] == pytest.approx(dense[s.name][0].item(), rel=1e-4)
        assert (dense[s.name] > 1e-4 * s.values[0]).sum().item() == 1


def test_zero_initialised_adapter_gives_zero_spectrum_and_no_advice(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    spectra = compute_spectra(model)
    report = advise_ranks(spectra)

    assert len(spectra) == 6
    for s in spectra:
        assert s.values == (0.0,) * 8
        assert (s.effective_rank_90, s.effective_rank_95, s.top1_energy) == (0, 0, 0.0)
        assert energy_share(s, 3) == 0.0
    assert {a.verdict for a in report.modules + report.kinds} == {"untrained"}
    assert report.summary.startswith("the update is still zero")


@pytest.mark.parametrize(
    ("values", "k90", "k95", "top1"),
    [
        ([3.0, 1.0, 0.0, 0.0], 1, 2, 0.9),  # energies 9, 1: the first holds exactly 90%
        ([1.0, 1.0, 1.0, 1.0], 4, 4, 0.25),
        ([1.0, 2.0, 1.0], 3, 3, 4 / 6),  # sorted first: energies 4, 1, 1 -> 67%, 83%, 100%
        ([10.0, 3.0, 1.0], 1, 2, 100 / 110),  # 90.9%, 99.1%
        ([0.0, 0.0], 0, 0, 0.0),
    ],
)
def test_effective_ranks_of_constructed_spectra(values, k90, k95, top1):
    s = spectrum_from_values("m", values, rank=len(values))

    assert s.values == tuple(sorted(values, reverse=True))
    assert (s.effective_rank_90, s.effective_rank_95) == (k90, k95)
    assert s.top1_energy == pytest.approx(top1, rel=1e-12)
    assert energy_share(s, 1) == pytest.approx(top1, rel=1e-12)
    total = sum(v * v for v in values)
    assert energy_share(s, 2) == pytest.approx(sum(sorted((v * v for v in values), reverse=True)[:2]) / total
                                               if total else 0.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_folder_spectra_equal_live_spectra(tiny_llama, tmp_path, rslora):
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, use_rslora=rslora,
        rank_pattern={"embed_tokens": 5, **RANK_PATTERN}, alpha_pattern=ALPHA_PATTERN,
    )
    model = get_peft_model(tiny_llama, config)
    model.save_pretrained(tmp_path)

    live = {s.name: s for s in compute_spectra(model)}
    saved = read_adapter_spectra(tmp_path)

    assert sorted(s.name for s in saved) == sorted(live)
    for s in saved:
        expected = live[s.name]
        assert s.rank == expected.rank
        assert s.values == pytest.approx(expected.values, rel=1e-5, abs=1e-6 * expected.values[0])
        assert (s.effective_rank_90, s.effective_rank_95) == (expected.effective_rank_90, expected.effective_rank_95)
    assert live["model.layers.1.self_attn.q_proj"].rank == 4
    assert live["model.layers.1.mlp.down_proj"].rank == 12


def test_spectra_of_a_bin_adapter_equal_those_of_the_same_adapter_as_safetensors(tiny_llama, tmp_path):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "down_proj"],
                        init_lora_weights=False, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    model = get_peft_model(tiny_llama, config)
    model.save_pretrained(tmp_path / "safetensors")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.bin"]

    from_bin = read_adapter_spectra(tmp_path / "bin")

    assert len(from_bin) == 3 * 2 + 1  # q_proj and down_proj in three layers, the embedding
    assert from_bin == read_adapter_spectra(tmp_path / "safetensors")


def _saved_adapter(tiny_llama, folder):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _no_folder(folder):
    return folder / "nowhere"


def _no_config(folder):
    (folder / "adapter_config.json").unlink()


def _broken_config(folder):
    (folder / "adapter_config.json").write_text("{not json")


def _ia3_config(folder):
    _edit_config(folder, peft_type="IA3")


def _zero_rank(folder):
    _edit_config(folder, r=0)


def _other_rank(folder):
    _edit_config(folder, r=8)


def _bad_pattern(folder):
    _edit_config(folder, rank_pattern={"q_proj(": 2})


def _only_a_matrices(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "lora_B" not in k}, path)


def _garbage_weights(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_no_folder, "no such adapter folder"),
        (_no_config, "has no adapter_config.json"),
        (_broken_config, "is not readable JSON"),
        (_ia3_config, "holds an adapter of type IA3, not LoRA"),
        (_zero_rank, "has no positive `r`"),
        (_other_rank, "rank 4 in adapter_model.safetensors but adapter_config.json gives r=8"),
        (_bad_pattern, "'q_proj\\(' is not a valid module pattern"),
        (_only_a_matrices, "lacks the LoRA B matrix of model.layers.0.self_attn.q_proj"),
        (_garbage_weights, "damaged or not a weights file"),
    ],
)
def test_unusable_adapter_folder_raises_export_error(tiny_llama, tmp_path, damage, message):
    folder = _saved_adapter(tiny_llama, tmp_path)
    folder = damage(folder) or folder

    with pytest.raises(ExportError, match=message):
        read_adapter_spectra(folder)


def test_rank_advice_on_constructed_spectra():
    spectra = [
        spectrum_from_values("model.layers.0.self_attn.q_proj", [10.0, 3.0, 1.0] + [0.0] * 13, 16),
        spectrum_from_values("model.layers.1.self_attn.q_proj", [1.0] * 5 + [0.0] * 11, 16),
        spectrum_from_values("model.layers.0.self_attn.v_proj", [1.0] * 8, 8),
        spectrum_from_values("model.layers.1.self_attn.v_proj", [1.0] * 5 + [0.0] * 3, 8),
        spectrum_from_values("model.embed_tokens", [0.0] * 8, 8),
    ]

    report = advise_ranks(spectra)

    assert report.modules == (
        RankAdvice("model.layers.0.self_attn.q_proj", 16, 2, 2, "smaller"),
        RankAdvice("model.layers.1.self_attn.q_proj", 16, 5, 8, "smaller"),
        RankAdvice("model.layers.0.self_attn.v_proj", 8, 8, 8, "full"),
        RankAdvice("model.layers.1.self_attn.v_proj", 8, 5, 8, "full"),
        RankAdvice("model.embed_tokens", 8, 0, 8, "untrained"),
    )
    # a kind is judged by its most demanding trained module
    assert report.kinds == (
        RankAdvice("q_proj", 16, 5, 8, "smaller"),
        RankAdvice("v_proj", 8, 8, 8, "full"),
        RankAdvice("embed_tokens", 8, 0, 8, "untrained"),
    )
    assert report.summary == (
        "95% of the update fits a smaller rank: q_proj 16→8; v_proj uses the rank fully; embed_tokens still untrained"
    )
    assert advise_ranks([]).summary == "no LoRA modules to advise on"


def test_default_model_all_linear_gives_210_spectra_under_base_names(fresh_default_model):
    base = fresh_default_model.model
    base_names = {name for name, _ in base.named_modules()}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights="gaussian"))
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.normal_()

    spectra = compute_spectra(model)

    assert len(spectra) == 210
    assert spectra[0].name == "model.layers.0.self_attn.q_proj"
    assert spectra[-1].name == "model.layers.29.mlp.down_proj"
    assert {s.name for s in spectra} <= base_names
    assert {s.rank for s in spectra} == {8}
    assert spectra[0].values[0] > 0 and all(math.isfinite(v) for v in spectra[0].values)
    assert sum(1 for s in spectra if s.top1_energy > 0) == 1
