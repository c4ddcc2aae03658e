"""`lynx generate` with LoRAs, a speed preset and strength flags, run as a subprocess on tiny saved models."""

import json

import numpy as np
from PIL import Image
from test_cli import TINY, lynx
from test_lora import write_layout


def test_turbo_with_a_lora_prints_what_it_set_and_records_it(tiny_base, adapter_dirs, face_embedding,
                                                             reference_crop, tmp_path):
    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    lora = write_layout(tmp_path / "distill.safetensors", "kohya")
    out = tmp_path / "clip.mp4"
    r = lynx("generate", "--embedding", tmp_path / "emb.npy", "--reference", tmp_path / "crop.png",
             "--prompt", "a man walks", "--base", tiny_base, "--adapter", adapter_dirs["full"], "--out", out,
             *[a for a in TINY if a not in ("--steps", "2")], "--speed", "turbo", "--lora", f"{lora}:0.8",
             "--ip-end", "0.5", "--ref-blocks", "0-2")
    assert r.returncode == 0, r.stderr
    assert f"LoRA {lora} as 'distill' at scale 0.8" in r.stderr
    assert "speed turbo: 4 steps of FlowMatchLCM" in r.stderr and "1000/750/500/250" in r.stderr
    assert "4/4" in r.stderr  # the preset's step count
    meta = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert meta["num_inference_steps"] == 4 and meta["guidance_scale"] == 1.0 and meta["guidance_scale_i"] == "two-way"
    assert meta["ip_scale"] == 0.8 and meta["ref_scale"] == 0.6
    assert meta["speed"]["preset"] == "turbo" and meta["speed"]["loras"][0]["scale"] == 0.8
    assert meta["ip_end"] == 0.5 and meta["ref_end"] == 0.5 and meta["ref_blocks"] == "0-2"


def test_turbo_needs_a_lora_lora_files_must_exist_and_compile_fits_the_presets(tiny_base, adapter_dirs, tmp_path):
    np.save(tmp_path / "emb.npy", np.ones(512, np.float32))
    common = ["generate", "--embedding", tmp_path / "emb.npy", "--prompt", "a man walks", "--base", tiny_base,
              "--adapter", adapter_dirs["lite"], "--out-dir", tmp_path]
    r = lynx(*common, "--speed", "turbo")
    assert r.returncode == 2 and "--speed turbo needs a step-distill LoRA" in r.stderr
    r = lynx(*common, "--lora", tmp_path / "missing.safetensors:0.5")
    assert r.returncode == 2 and "missing.safetensors does not exist" in r.stderr
    # Refused before anything loads: compiled blocks under a step cache or layer-by-layer streaming.
    r = lynx(*common, "--speed", "fast", "--compile")
    assert r.returncode == 2 and "--compile does not combine with a step cache (--speed fast)" in r.stderr
    assert "Traceback" not in r.stderr and "loading" not in r.stderr
    r = lynx(*common, "--memory", "12gb", "--compile")
    assert r.returncode == 2 and "with --compile use --memory 24gb-blocks or 24gb" in r.stderr
    assert "loading" not in r.stderr


def test_serve_refuses_a_bad_lora_file_before_it_starts(tmp_path):
    """`lynx serve` shares generate's check (`check_speed_options`): the file is read before the port is bound."""
    (tmp_path / "junk.safetensors").write_text("<html>404 Not Found</html>")
    r = lynx("serve", "--port", "0", "--out-dir", tmp_path / "out", "--lora", tmp_path / "junk.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "open http" not in r.stderr, r.stderr
    assert f"--lora {tmp_path}/junk.safetensors is not a safetensors file" in r.stderr


def test_the_printed_preset_lines_show_the_values_given_over_the_preset(tiny_base, adapter_dirs, tmp_path):
    """`--speed exact --steps 2` runs 2 steps: the line says 2 and that --steps was given, not the recipe's 50."""
    np.save(tmp_path / "emb.npy", np.ones(512, np.float32))
    common = ["generate", "--embedding", tmp_path / "emb.npy", "--prompt", "a man walks", "--base", tiny_base,
              "--adapter", adapter_dirs["lite"], "--out-dir", tmp_path, "--height", "32", "--width", "32",
              "--frames", "5"]
    r = lynx(*common, "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert ("speed exact: the authors' recipe (2 UniPC steps, 2-way guidance (2 transformer passes per step), "
            "adapters on every step); given explicitly: --steps 2 (the recipe's 50)") in r.stderr
    lora = write_layout(tmp_path / "distill.safetensors", "kohya")
    r = lynx(*common, "--speed", "turbo", "--lora", lora, "--steps", "2", "--ip-scale", "1", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert ("speed turbo: 2 steps of FlowMatchLCM (x0 then re-noise), shift 5.0, timesteps 1000/500 before the "
            "shift; given explicitly: --steps 2 (the preset's 4)") in r.stderr
    assert "speed turbo: ip_scale 1.0, ref_scale 0.6, " in r.stderr and "--ip-scale 1.0 (the preset's 0.8)" in r.stderr
    assert "2/2" in r.stderr  # the steps that ran
