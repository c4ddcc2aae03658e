"""`lynx prepare` / `lynx train` on the command line: registered, and user mistakes end in one clear line."""

import pytest

from lynx.apps.cli import build_parser, main
from lynx.errors import InputError


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["train", "--config", "c.toml", "--resume", "--set", "train.steps=5"])
    assert args.resume == "auto" and args.set == ["train.steps=5"]
    args = parser.parse_args(["prepare", "--config", "c.toml", "--shard", "1/4", "--limit", "3"])
    assert args.shard == "1/4" and args.limit == 3


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_missing_or_invalid_config(command, tmp_path, capsys):
    assert main([command, "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 10\nlearnig_rate = 1e-5\n")
    assert main([command, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) train.learnig_rate" in err and "Traceback" not in err
    assert main([command, "--config", str(bad), "--set", "train.steps"]) == 2
    assert "section.key=value" in capsys.readouterr().err


def test_prepare_reports_missing_face_models_before_loading_anything(tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LYNX_FACE_MODELS", str(tmp_path / "no-face-models"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "caption": "x"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nmanifest = "{tmp_path}/m.jsonl"\ncache_dir = "{tmp_path}/cache"\n'
                   f'[train]\nbase = "{tiny_base}"\n')
    assert main(["prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "lynx prepare: error:" in err and "no-face-models" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("manifest,args,words", [
    ("m.jsonl", ["--limit", "0"], "--limit 0"),
    ("m.jsonl", ["--limit", "-2"], "--limit -2"),
    ("latin1.jsonl", [], "not UTF-8"),
    ("noheader.csv", [], "header"),
], ids=["limit 0", "negative limit", "not UTF-8", "CSV without its header"])
def test_prepare_refuses_before_any_model_loads_and_leaves_no_cache(tiny_base, tmp_path, capsys, monkeypatch,
                                                                      manifest, args, words):
    from lynx.training import data

    monkeypatch.setattr(data, "face_identity_fn", lambda *a, **k: pytest.fail("face models were loaded"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "caption": "x"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"path": "a.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp_path / "noheader.csv").write_text("a.png,x\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nmanifest = "{tmp_path / manifest}"\ncache_dir = "{tmp_path}/cache"\n'
                   f'[train]\nbase = "{tiny_base}"\n')
    assert main(["prepare", "--config", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()
    if not args:  # the library call refuses the same manifest without making the cache folder first
        from lynx.training.config import load_training_config

        with pytest.raises(InputError, match=words):
            data.prepare(load_training_config(cfg), identity_fn=lambda frame: None, encoders=object())
        assert not (tmp_path / "cache").exists()


def test_stage_configs_parse():
    from pathlib import Path

    from lynx.training.config import load_training_config

    root = Path(__file__).resolve().parents[1] / "configs"
    one, two = (load_training_config(root / f"train_stage{i}.toml") for i in (1, 2))
    assert one.data.frames == (1,) and max(two.data.frames) == 81
    for c in (one, two):
        assert c.train.learning_rate == 1e-5 and c.train.weight_decay == 0.01 and c.train.token_budget == 33600


def test_train_refuses_an_earlier_runs_output_dir_without_resume(tiny_base, tmp_path, capsys, monkeypatch):
    from lynx.training import trainer

    monkeypatch.setattr(trainer, "setup_runtime", lambda: pytest.fail("the run started"))
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    (cache / "index.jsonl").write_text("{}\n")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-00000100\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ncache_dir = "{cache}"\n[train]\nbase = "{tiny_base}"\noutput_dir = "{out}"\n')
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoints" / "latest").read_text() == "step-00000100\n"
    out_file = tmp_path / "a-file"
    out_file.write_text("")
    assert main(["train", "--config", str(cfg), "--set", f'train.output_dir="{out_file}"']) == 2
    assert "is a file" in capsys.readouterr().err
