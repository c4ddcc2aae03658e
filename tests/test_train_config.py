"""Training configs: typed, checked whole at load, every mistake named by its key and allowed values before any
model loads; nested typed overrides; one dtype vocabulary."""

import re
from pathlib import Path

import pytest

from lynx.apps.cli import main
from lynx.errors import InputError
from lynx.runtime import DTYPES
from lynx.training import trainer as T
from lynx.training.config import load_training_config, training_config_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (what is wrong, config values, words the one-line message must contain)
BAD = [
    ("save dtype in torch's spelling", {"train": {"save_dtype": "bfloat16"}}, ["train.save_dtype", "'fp32', 'bf16'"]),
    ("prepare dtype unknown", {"data": {"dtype": "fp8"}}, ["data.dtype", "'fp32', 'bf16' or 'fp16'"]),
    ("cache dtype unknown", {"data": {"cache_dtype": "float32"}}, ["data.cache_dtype", "'fp16'"]),
    ("precision unknown", {"train": {"precision": "fp16"}}, ["train.precision", "'bf16' or 'fp32'"]),
    ("unknown key", {"train": {"learnig_rate": 1e-4}}, ["unknown setting(s) train.learnig_rate", "learning_rate"]),
    ("unknown nested key", {"train": {"resampler": {"dimm": 64}}}, ["train.resampler.dimm", "dim_head"]),
    ("unknown table", {"trian": {"steps": 1}}, ["unknown table(s) [trian]", "[train]"]),
    ("negative learning rate", {"train": {"learning_rate": -1e-5}}, ["train.learning_rate", "greater than or equal"]),
    ("learning rate not a number", {"train": {"learning_rate": float("nan")}}, ["train.learning_rate", "finite"]),
    ("bucket not a multiple of 16", {"data": {"buckets": [[480, 830]]}}, ["data.buckets", "816 or 832"]),
    ("bucket with three sides", {"data": {"buckets": [[480, 832, 3]]}}, ["data.buckets", "at most 2"]),
    ("clip length not 4k+1", {"data": {"frames": [1, 80]}}, ["data.frames", "77 or 81"]),
    ("dropout above 1", {"train": {"drop_text": 1.5}}, ["train.drop_text", "less than or equal to 1"]),
    ("zero steps", {"train": {"steps": 0}}, ["train.steps", "greater than or equal to 1"]),
    ("steps as text", {"train": {"steps": "many"}}, ["train.steps", "valid integer"]),
    ("steps as a boolean", {"train": {"steps": True}}, ["train.steps", "valid integer"]),
    ("beta of 1", {"train": {"betas": [0.9, 1.0]}}, ["train.betas.1", "less than 1"]),
    ("schedule unknown", {"train": {"lr_schedule": "linear"}}, ["train.lr_schedule", "'constant' or 'cosine'"]),
    ("variant unknown", {"train": {"variant": "pro"}}, ["train.variant", "'full' or 'lite'"]),
    ("attention mode unknown", {"train": {"attention": "flash"}}, ["train.attention", "'varlen'"]),
    ("attention backend unknown", {"train": {"attention_backend": "bogus"}}, ["train.attention_backend", "flash"]),
    ("validation format", {"validation": {"format": ".avi"}}, ["validation.format", "'.mp4', '.webp' or '.gif'"]),
    ("validation height", {"validation": {"height": 100}}, ["validation.height", "96 or 112"]),
    ("validation fps", {"validation": {"fps": 0}}, ["validation.fps", "greater than or equal to 1"]),
    ("upscale below 1", {"data": {"max_upscale": 0.5}}, ["data.max_upscale", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("what,values,words", BAD, ids=[b[0] for b in BAD])
def test_each_bad_config_fails_at_load_naming_the_key(what, values, words):
    with pytest.raises(InputError) as e:
        training_config_from_dict(values)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (what, message)


def test_all_problems_are_reported_at_once():
    with pytest.raises(InputError) as e:
        training_config_from_dict({"train": {"steps": 0, "learning_rate": -1.0}, "data": {"dtype": "x"}})
    assert all(k in str(e.value) for k in ("train.steps", "train.learning_rate", "data.dtype"))


def test_one_dtype_vocabulary():
    for path in CONFIGS.glob("*.toml"):
        config = load_training_config(path)
        for value in (config.data.cache_dtype, config.data.dtype, config.train.precision, config.train.save_dtype):
            assert value in DTYPES, (path.name, value)
        assert "float" not in path.read_text().replace("float32", "")  # no torch spellings left in the files


def test_nested_typed_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 10\n")
    config = load_training_config(path, ["train.resampler.dim=64", "train.betas=[0.8, 0.95]",
                                         "train.base=models/some base", "validation.prompts=[\"a\", \"b\"]"])
    assert config.train.resampler.dim == 64 and config.train.resampler.depth == 4  # the rest keep their defaults
    assert config.train.resampler.to_config().dim == 64
    assert config.train.betas == (0.8, 0.95) and config.train.base == "models/some base"
    assert config.validation.prompts == ("a", "b") and config.train.steps == 10
    with pytest.raises(InputError, match="train.resampler.dim: Input should be a valid integer"):
        load_training_config(path, ["train.resampler.dim=wide"])
    with pytest.raises(InputError, match="train.steps: Input should be a valid integer"):
        load_training_config(path, ["train.steps=1.5"])
    with pytest.raises(InputError, match="is a value, not a table"):
        load_training_config(path, ["train.steps.x=1"])
    with pytest.raises(InputError, match="section.key=value"):
        load_training_config(path, ["steps=1"])


def test_the_cli_reports_a_bad_override_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 10\n")
    assert main(["train", "--config", str(path), "--set", "train.save_dtype=bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "train.save_dtype" in err and "'bf16'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def no_model(monkeypatch):
    """Building the model (or joining a process group) fails the test: file errors must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the config error was found")

    monkeypatch.setattr(T, "build_model", fail)
    monkeypatch.setattr(T, "setup_runtime", fail)


@pytest.mark.parametrize("train,data,words", [
    ({"base": "{tmp}/no-base"}, {}, ["train.base", "not found"]),
    ({"base": ""}, {}, ["train.base", "not set"]),
    ({}, {"cache_dir": "{tmp}/no-cache"}, ["data.cache_dir", "lynx prepare"]),
    ({"init": "{tmp}/no-adapters"}, {}, ["train.init", "scratch"]),
], ids=["missing base", "unset base", "missing cache", "missing init"])
def test_missing_files_are_found_before_any_model_loads(tiny_base, tmp_path, no_model, train, data, words):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.jsonl").write_text("{}\n")
    fill = lambda d: {k: v.replace("{tmp}", str(tmp_path)) for k, v in d.items()}  # noqa: E731
    config = training_config_from_dict({"train": {"base": str(tiny_base), **fill(train)},
                                        "data": {"cache_dir": str(cache), **fill(data)}})
    with pytest.raises(InputError) as e:
        T.train(config, progress=False)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("init,download,then", [
    ("my adapters", "--include 'lynx_lite/*' --local-dir '{tmp}/my adapters'", '"{tmp}/my adapters/lynx_lite"'),
    ("models/lynx_full", "--include 'lynx_full/*' --local-dir {tmp}/models", None),
], ids=["a folder of any name", "a lynx_full folder"])
def test_download_hints_name_the_folders_the_config_points_at(tiny_base, tmp_path, no_model, init, download, then):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.jsonl").write_text("{}\n")
    (tmp_path / init).mkdir(parents=True)
    config = training_config_from_dict({"train": {"base": str(tiny_base), "init": str(tmp_path / init),
                                                  "variant": "lite"}, "data": {"cache_dir": str(cache)}})
    with pytest.raises(InputError) as e:
        T.train(config, progress=False)
    message = str(e.value)
    assert f"train.init: {tmp_path / init} has no resampler.safetensors" in message and "\n" not in message
    assert "hf download ByteDance/lynx " + download.replace("{tmp}", str(tmp_path)) in message
    assert then is None or f"then set train.init = {then.replace('{tmp}', str(tmp_path))}" in message
    config = training_config_from_dict({"train": {"base": str(tmp_path / "my base")},
                                        "data": {"cache_dir": str(cache)}})
    with pytest.raises(InputError, match=re.escape(f"--local-dir '{tmp_path}/my base'")):
        T.train(config, progress=False)


def test_prepare_names_a_missing_manifest(tiny_base, tmp_path):
    from lynx.training.data import prepare

    config = training_config_from_dict({"train": {"base": str(tiny_base)},
                                        "data": {"manifest": str(tmp_path / "m.jsonl"), "cache_dir": str(tmp_path)}})
    with pytest.raises(InputError, match="data.manifest"):
        prepare(config, identity_fn=lambda frame: None, encoders=object(), progress=False)
