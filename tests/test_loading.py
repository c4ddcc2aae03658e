"""Loading the base directory and the official adapter files; every broken input gets a message naming it."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lynx.errors import CheckpointError, WeightsNotFoundError
from lynx.models.adapters import adapter_config
from lynx.models.loading import inspect_base_dir, load_adapters, read_adapter_config, require_base_dir, save_adapters
from lynx.testing import add_tiny_adapters, tiny_transformer

BLOCKS, WIDTH = 4, 24


def loaded(adapter_dir):
    """A tiny transformer with the adapters of `adapter_dir` installed, and the resampler."""
    transformer = tiny_transformer()
    return transformer, load_adapters(transformer, adapter_dir)


def adapter_state(transformer, resampler):
    return {**{f"resampler.{k}": v for k, v in resampler.state_dict().items()},
            **{k: v for k, v in transformer.state_dict().items() if ".processor." in k}}


@pytest.mark.parametrize("kind,variant,registers,ip_blocks", [
    ("full", "full", 0, (0, 1, 2, 3)), ("registers", "full", 3, (0, 1, 2, 3)), ("lite", "lite", 0, (0, 2))])
def test_variants_detected_from_files(adapter_dirs, kind, variant, registers, ip_blocks):
    transformer, resampler = loaded(adapter_dirs[kind])
    cfg = adapter_config(transformer)
    assert (cfg.variant, cfg.num_registers, cfg.ip_blocks) == (variant, registers, ip_blocks)
    assert cfg.use_ref == (variant == "full") and cfg.ip_bias == (variant == "full")
    assert not any(p.requires_grad for p in adapter_state(transformer, resampler).values())
    assert not any(p.device.type == "meta" for p in transformer.parameters())


def test_official_key_layout(adapter_dirs):
    ip = load_file(adapter_dirs["registers"] / "ip_layers.safetensors")
    assert {"0.to_k_ip.weight", "0.to_k_ip.bias", "0.to_v_ip.weight", "0.to_v_ip.bias", "0.registers"} <= set(ip)
    assert ip["0.registers"].shape == (1, 3, WIDTH)
    ref = load_file(adapter_dirs["full"] / "ref_layers.safetensors")
    assert set(ref) == {f"{i}.{n}.{p}" for i in range(BLOCKS) for n in ("to_k_ref", "to_v_ref")
                        for p in ("weight", "bias")}
    lite = load_file(adapter_dirs["lite"] / "ip_layers.safetensors")
    assert set(lite) == {f"{i}.{n}.weight" for i in range(2) for n in ("to_k_ip", "to_v_ip")}
    assert lite["0.to_k_ip.weight"].shape == (WIDTH, 16)
    assert not (adapter_dirs["lite"] / "ref_layers.safetensors").exists()


@pytest.mark.parametrize("variant,registers", [("full", 0), ("full", 2), ("lite", 0)])
def test_save_load_round_trip(tmp_path, variant, registers):
    original = tiny_transformer()
    resampler = add_tiny_adapters(original, variant, num_registers=registers, seed=11)
    save_adapters(tmp_path, original, resampler)
    a, b = adapter_state(original, resampler), adapter_state(*loaded(tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_directory_says_what_to_download(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        read_adapter_config(tmp_path / "lynx_full", BLOCKS, WIDTH)
    assert "hf download ByteDance/lynx" in str(e.value) and "lynx_full" in str(e.value)


def test_missing_file_is_named(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    (d / "resampler.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="resampler.safetensors is missing"):
        read_adapter_config(d, BLOCKS, WIDTH)


def test_truncated_file_is_named(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    f = d / "ref_layers.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="ref_layers.safetensors could not be read"):
        read_adapter_config(d, BLOCKS, WIDTH)


def test_lite_on_base_of_other_width(adapter_dirs):
    with pytest.raises(CheckpointError, match="width 24, but the transformer is 48 wide"):
        read_adapter_config(adapter_dirs["lite"], BLOCKS, 48)


def test_ref_layers_for_another_depth(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    ip = load_file(d / "ip_layers.safetensors")
    save_file({k: v for k, v in ip.items() if int(k.split(".")[0]) < 2}, d / "ip_layers.safetensors")
    with pytest.raises(CheckpointError, match="ID layers for 2 blocks"):
        read_adapter_config(d, BLOCKS, WIDTH)
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "b")
    ref = load_file(d / "ref_layers.safetensors")
    save_file({k: v for k, v in ref.items() if int(k.split(".")[0]) < 3}, d / "ref_layers.safetensors")
    with pytest.raises(CheckpointError, match="Ref layers for 3 blocks, but the transformer has 4"):
        read_adapter_config(d, BLOCKS, WIDTH)


def test_full_without_ref_layers(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    (d / "ref_layers.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ref_layers.safetensors is missing"):
        read_adapter_config(d, BLOCKS, WIDTH)


def test_wrong_shape_inside_file(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    res = load_file(d / "resampler.safetensors")
    res["layers.1.0.to_out.weight"] = torch.zeros(3, 3)
    save_file(res, d / "resampler.safetensors")
    transformer = tiny_transformer()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(CheckpointError, match="resampler.safetensors does not match.*to_out"):
        load_adapters(transformer, d)
    after = transformer.state_dict()
    assert adapter_config(transformer) is None and before.keys() == after.keys()  # a bad file changes nothing


def test_bad_ref_file_leaves_the_transformer_as_it_was(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    ref = load_file(d / "ref_layers.safetensors")
    ref["2.to_v_ref.bias"] = torch.zeros(5)
    save_file(ref, d / "ref_layers.safetensors")
    transformer = tiny_transformer()
    keys = set(transformer.state_dict())
    with pytest.raises(CheckpointError, match="ref_layers.safetensors does not match.*to_v_ref.bias"):
        load_adapters(transformer, d)
    assert set(transformer.state_dict()) == keys and adapter_config(transformer) is None



def test_foreign_keys(adapter_dirs, tmp_path):
    d = shutil.copytree(adapter_dirs["full"], tmp_path / "a")
    save_file({"model.weight": torch.zeros(2, 2)}, d / "ip_layers.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key 'model.weight'"):
        read_adapter_config(d, BLOCKS, WIDTH)


def test_base_dir_inspection(tiny_base, tmp_path):
    report = inspect_base_dir(tiny_base)
    assert report.ok and report.transformer_config["num_layers"] == BLOCKS
    broken = shutil.copytree(tiny_base, tmp_path / "base")
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsNotFoundError) as e:
        require_base_dir(broken)
    msg = str(e.value)
    assert "vae is missing" in msg
    assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --include 'vae/*' --local-dir" in msg
    # Only the missing part is named: not the whole base, not the adapters, and not the old CLI's name.
    assert "tens of gigabytes" not in msg and "ByteDance/lynx" not in msg and "huggingface-cli" not in msg


def test_model_paths_that_are_the_wrong_kind_of_thing_say_so(tmp_path):
    """A file where the base folder goes, or a folder where a GGUF file goes: named as what it is, not missing."""
    from lynx.errors import InputError
    from lynx.models.loading import check_transformer_files

    (tmp_path / "base").write_text("not a folder")
    assert inspect_base_dir(tmp_path / "base").problems == [f"{tmp_path}/base is a file, not a folder"]
    assert inspect_base_dir(tmp_path / "none").problems == [f"{tmp_path}/none does not exist"]
    (tmp_path / "q4.gguf").mkdir()
    with pytest.raises(InputError, match="q4.gguf is a folder, not a file"):
        check_transformer_files({"transformer": tmp_path / "q4.gguf"})
    with pytest.raises(WeightsNotFoundError, match="q5.gguf does not exist"):
        check_transformer_files({"transformer": tmp_path / "q5.gguf"})
