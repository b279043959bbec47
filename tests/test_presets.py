"""ROME presets are data files (kn_utils/resources/rome_presets/<model>-<config>.json): every file
loads and is well formed, and the presets equal the values the code held before they became data."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from kn_utils.editing.rome import hparams as H
from kn_utils.editing.rome.hparams import ROMEHyperParams

# The presets as ROMEHyperParams.preset built them in code (main at 42640b7), field by field.
_COMMON = dict(v_lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0625, context_template_length_params=[[5, 10], [10, 10]],
               mom2_n_samples=100_000, mom2_sample="texts", update="rome_code", mom2_update_weight=1.0,
               early_stop_loss=5e-2, seed=0)
_BY_MODEL = {
    "gpt2-xl": dict(layer=17, v_num_grad_steps=20, v_loss_layer=47, v_weight_decay=0.5, mom2_dataset="wikipedia"),
    "llama-2-7b": dict(layer=5, v_num_grad_steps=25, v_loss_layer=31, v_weight_decay=1e-3, mom2_dataset="wikipedia"),
    "default": dict(layer=4, v_num_grad_steps=20, v_loss_layer=None, v_weight_decay=0.5, mom2_dataset="auto"),
    "gemma-3-270m": dict(layer=3, v_num_grad_steps=20, v_loss_layer=None, v_weight_decay=0.5, mom2_dataset="auto"),
}
BEFORE = {(m, c): {**_COMMON, **v, "mom2_adjustment": c == "rome"} for m, v in _BY_MODEL.items()
          for c in ("paper", "rome")}
# Gemma's paper configuration: its own sweep with the covariance off (benchmarks/layer_sweep_gemma_paper.csv)
BEFORE["gemma-3-270m", "paper"]["layer"] = 1
FILES = sorted(H.PRESET_DIR.glob("*.json"))


def test_every_preset_of_before_is_a_file_and_nothing_else():
    assert {f.name for f in FILES} == {f"{m}-{c}.json" for m, c in BEFORE}
    assert H.preset_names() == sorted(_BY_MODEL)


@pytest.mark.parametrize("model,config", sorted(BEFORE))
def test_preset_values_equal_the_former_code(model, config):
    hp = ROMEHyperParams.preset(model, config)
    assert dataclasses.asdict(hp) == BEFORE[model, config]
    assert {f.name for f in dataclasses.fields(ROMEHyperParams)} == set(BEFORE[model, config])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_file_has_the_format(path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert list(raw) == ["model", "config", "match", "hparams", "layer_source"]
    assert path.name == f"{raw['model']}-{raw['config']}.json" and raw["config"] in ("paper", "rome")
    assert raw["match"] is None or set(raw["match"]) == {"family", "n_layers", "d_model"}
    assert set(raw["layer_source"]) == {"file", "row", "why"}
    assert all(isinstance(v, str) and v.strip() for v in raw["layer_source"].values())
    # the layer cited is the layer set
    assert str(raw["hparams"]["layer"]) in raw["layer_source"]["row"]
    assert H.load_preset(path) == raw


def test_sweep_files_cited_by_presets_exist():
    root = H.PRESET_DIR.parents[2]
    for path in FILES:
        cited = json.loads(path.read_text())["layer_source"]["file"]
        if cited.startswith("benchmarks/"):
            assert (root / cited).is_file(), f"{path.name} cites {cited}, which is not in the checkout"


def _lm(family, n_layers, d_model):
    return SimpleNamespace(arch=SimpleNamespace(family=family, n_layers=n_layers, d_model=d_model),
                           device=SimpleNamespace(type="cuda"))


@pytest.mark.parametrize("config", ["paper", "rome"])
def test_for_model_picks_by_shape_from_the_files(config):
    assert ROMEHyperParams.for_model(_lm("gpt2", 48, 1600), config).layer == 17
    assert ROMEHyperParams.for_model(_lm("llama", 32, 4096), config).v_num_grad_steps == 25
    assert ROMEHyperParams.for_model(_lm("gemma3_text", 18, 640), config).layer == (1 if config == "paper" else 3)
    # the embedded default (no match): fallback at the same relative depth
    assert ROMEHyperParams.for_model(_lm("llama", 30, 576), config).layer == 4
    assert ROMEHyperParams.for_model(_lm("mistral", 60, 512), config).layer == 8
    assert ROMEHyperParams.for_model(_lm("gpt2", 48, 1600), config).mom2_adjustment == (config == "rome")


def test_unknown_names_and_configs():
    with pytest.raises(ValueError, match="unknown ROME preset 'gpt3'.*presets"):
        ROMEHyperParams.preset("gpt3")
    with pytest.raises(ValueError, match="unknown ROME configuration"):
        ROMEHyperParams.preset("default", "fast")


def test_a_new_model_is_a_new_file(tmp_path, monkeypatch):
    """write_preset writes the format load_preset reads; preset() and for_model() then know it."""
    for path in FILES:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(H, "PRESET_DIR", tmp_path)
    hp = dataclasses.replace(ROMEHyperParams.preset("default"), layer=2)
    source = {"file": "benchmarks/layer_sweep_new.csv", "row": "layer=2", "why": "best efficacy"}
    path = H.write_preset(hp, "tiny-new", "paper", match={"family": "qwen2", "n_layers": 6, "d_model": 64},
                          layer_source=source)
    assert path == tmp_path / "tiny-new-paper.json" and "[[5, 10], [10, 10]]" in path.read_text()
    assert ROMEHyperParams.preset("tiny-new") == hp
    assert ROMEHyperParams.for_model(_lm("qwen2", 6, 64)).layer == 2
    with pytest.raises(ValueError, match="no 'rome' configuration"):
        ROMEHyperParams.preset("tiny-new", "rome")


@pytest.mark.parametrize("damage,message", [
    (lambda r: r.pop("layer_source"), "exactly the keys"),
    (lambda r: r["hparams"].pop("v_lr"), r"missing \['v_lr'\]"),
    (lambda r: r["hparams"].update(v_lrr=1), r"unknown \['v_lrr'\]"),
    (lambda r: r["hparams"].update(v_lr=-1), "v_lr must lie in"),
    (lambda r: r.update(config="fast"), "config must be one of"),
    (lambda r: r.update(model="other"), "must be named other-paper.json"),
    (lambda r: r.update(match={"family": "llama"}), "match must be null or"),
    (lambda r: r["layer_source"].update(row=""), "layer_source must be"),
])
def test_a_bad_file_names_itself(tmp_path, damage, message):
    record = json.loads((H.PRESET_DIR / "default-paper.json").read_text())
    damage(record)
    path = tmp_path / "default-paper.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message) as info:
        H.load_preset(path)
    assert str(path) in str(info.value)
