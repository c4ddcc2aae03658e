"""GenerationSettings: defaults resolved per variant, one check with one-line errors, the CLI flags generated
from the fields, and the pipeline taking every field and returning the resolved settings."""

import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from conftest import SMALL

from lynx import LynxPipeline
from lynx.apps.cli import build_parser, settings_from_args
from lynx.constants import DEFAULT_NEGATIVE_PROMPT, SAMPLING_PRESETS, TWO_WAY
from lynx.errors import SettingsError
from lynx.pipelines.settings import FIXED_DEFAULTS, GenerationSettings, flag, flags, help_text

FIELDS = list(GenerationSettings.model_fields)


def test_resolve_fills_only_what_was_left_unset():
    full = GenerationSettings().resolve("full")
    lite = GenerationSettings().resolve("lite")
    for name in FIELDS[1:]:  # allow_large is a switch, not a variant default
        for settings, variant in ((full, "full"), (lite, "lite")):
            preset = SAMPLING_PRESETS[variant]
            expected = getattr(preset, name) if hasattr(preset, name) else preset.num_frames \
                if name == "context_frames" else FIXED_DEFAULTS.get(name, False if name == "batch_branches" else None)
            assert getattr(settings, name) == expected, name
    assert (full.ip_start, full.ip_end, full.ref_blocks, full.context_overlap, full.context_blend) == \
        (0.0, 1.0, "all", 16, "linear")
    assert full.guidance_scale_2 is None and full.face_index is None  # None is their meaning (RESOLVED_NONE)
    assert (full.num_frames, full.fps, full.guidance_scale_i, full.two_way) == (81, 16, 2.0, False)
    assert (lite.num_frames, lite.fps, lite.guidance_scale_i, lite.two_way) == (121, 24, TWO_WAY, True)
    assert full.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    # 0 and "" are values, not "unset"; explicit two-way on the full model stays two-way.
    given = GenerationSettings(ref_scale=0, negative_prompt="", guidance_scale_i=TWO_WAY, seed=0).resolve("full")
    assert (given.ref_scale, given.negative_prompt, given.two_way, given.seed) == (0.0, "", True, 0)
    assert isinstance(given.ref_scale, float)
    # Resolving twice changes nothing, and the settings are frozen.
    assert given.resolve("lite") == given
    with pytest.raises(Exception):
        given.seed = 3
    with pytest.raises(SettingsError, match="variant must be one of full, lite"):
        GenerationSettings().resolve("medium")


@pytest.mark.parametrize("kw,python,cli", [
    (dict(num_frames=6, height=30), "invalid video size: num_frames=6 is not 4k+1 (try 5 or 9); height=30 is not a "
                                    "positive multiple of 16 (try 16 or 32)",
     "invalid video size: --frames 6 is not 4k+1 (try 5 or 9); --height 30 is not a positive multiple of 16"),
    (dict(num_inference_steps=2.5), "num_inference_steps=2.5 must be a whole number (try 2 or 3)",
     "--steps 2.5 must be a whole number (try 2 or 3)"),
    (dict(height="64"), "height='64' must be a whole number, not str", "--height 64 must be a whole number"),
    (dict(num_inference_steps=1000), "num_inference_steps=1000 is above the limit of 200 (try 200, or pass "
                                     "allow_large=True to go higher on purpose)",
     "--steps 1000 is above the limit of 200 (try 200, or pass --allow-large to go higher on purpose)"),
    (dict(guidance_scale_i="default"), "guidance_scale_i='default' must be a number (three-way guidance) or "
                                       "'two-way'", "--guidance-i default must be a number"),
    (dict(seed=2**63), f"seed={2**63} must be in [0, 2**63) (try {2**63 - 1})", f"--seed {2**63} must be in"),
    (dict(fps=0, ip_scale=float("nan")), "ip_scale=nan must be a finite number; fps=0 must be between 1 and 240 "
                                         "(try 1)", "--ip-scale nan must be a finite number; --fps 0 must be"),
])
def test_one_line_errors_in_each_interfaces_words(kw, python, cli):
    with pytest.raises(SettingsError) as e:
        GenerationSettings(**kw)
    assert str(e.value).startswith(python) and "\n" not in str(e.value)
    assert e.value.render(flag).startswith(cli)


def test_limits_are_lifted_on_purpose():
    big = GenerationSettings(num_inference_steps=500, num_frames=401, height=2048, allow_large=True)
    assert (big.num_inference_steps, big.num_frames, big.height) == (500, 401, 2048)
    with pytest.raises(SettingsError, match="num_frames=401 is above the limit of 241"):
        GenerationSettings(num_frames=401)


def test_cli_flags_are_generated_from_the_fields():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    options = {a.dest: a for a in generate._actions}
    for name in FIELDS:
        assert options[name].option_strings == flags(name)
        assert options[name].help == help_text(name).replace("%", "%%")  # argparse %-formats help
    assert flags("num_inference_steps") == ["--steps", "--num-inference-steps"] and flags("seed") == ["--seed"]
    assert help_text("num_frames").endswith("(default 81 full, 121 lite)")
    assert help_text("guidance_scale_i").endswith("(default 2.0 full, two-way lite)")

    # Typed values become the settings; the resolved settings' own flags give them back.
    base = ["generate", "--prompt", "x", "--embedding", "e.npy"]
    args = parser.parse_args(base + ["--num-inference-steps", "7", "--guidance-i", "two-way", "--ref-scale", "0",
                                     "--negative-prompt", "blurry, 3 legs", "--allow-large"])
    typed = settings_from_args(args)
    assert (typed.num_inference_steps, typed.guidance_scale_i, typed.ref_scale) == (7, TWO_WAY, 0.0)
    assert typed.negative_prompt == "blurry, 3 legs" and typed.allow_large and typed.seed is None
    resolved = typed.resolve("full")
    assert settings_from_args(parser.parse_args(base + resolved.cli_args())).resolve("full") == resolved
    # The default negative prompt is what leaving the flag out means, so the command leaves it out.
    default = GenerationSettings().resolve("lite")
    assert "--negative-prompt" not in default.cli_args() and "--allow-large" not in default.cli_args()
    assert settings_from_args(parser.parse_args(base + default.cli_args())).resolve("lite") == default


def test_the_two_way_rule_and_the_defaults_are_written_once():
    root = Path(__file__).resolve().parent.parent / "lynx"
    sources = {p: p.read_text() for p in root.rglob("*.py")}

    def literals(text):
        return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.STRING]

    assert [p.name for p, text in sources.items() if {'"two-way"', "'two-way'"} & set(literals(text))] == \
        ["constants.py"]
    assert [p.name for p, text in sources.items() if "== TWO_WAY" in text] == ["settings.py"]
    assert not [p for p, text in sources.items() if re.search(r"guidance_scale_i\s*(==|=)\s*\"default\"", text)]
    # Default-filling from the variant's sampling defaults happens in `resolve` only.
    filling = [p.name for p, text in sources.items() if re.search(r"getattr\(config, name\)", text)]
    assert filling == ["settings.py"]


@pytest.fixture(scope="module")
def full(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])


def test_pipeline_takes_every_field_and_returns_the_resolved_settings(full, face_embedding, reference_crop,
                                                                      monkeypatch):
    params = inspect.signature(LynxPipeline.__call__).parameters
    for name in FIELDS:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default in (None, False)

    calls = []
    predict = full.predict
    monkeypatch.setattr(full, "predict", lambda *a, **k: calls.append(a[-1]) or predict(*a, **k))
    out = full("a man walks", face_embedding=face_embedding, reference_image=reference_crop,
               guidance_scale_i=TWO_WAY, fps=8, output_type="latent", **{**SMALL, "num_inference_steps": 2})
    assert calls == ["c", "u"] * 2  # two-way: no identity branch
    assert out.settings == GenerationSettings(guidance_scale_i=TWO_WAY, fps=8, **{**SMALL, "num_inference_steps": 2},
                                              ).resolve("full")
    # A generator replaces the seed, and the output says which seed it was.
    gen = torch.Generator().manual_seed(1234)
    out = full("a man walks", face_embedding=face_embedding, reference_image=reference_crop, generator=gen,
               output_type="latent", **{**SMALL, "num_inference_steps": 1})
    assert out.settings.seed == 1234 and out.settings.guidance_scale_i == 2.0


def test_a_short_context_window_with_the_default_overlap(full, face_embedding, reference_crop):
    """A clip no longer than its window is one window: the default overlap (16 frames) does not apply and must not
    refuse it. A longer clip with that window does overlap: refused, saying the overlap is the default and the fix."""
    out = full("a man walks", face_embedding=face_embedding, reference_image=reference_crop, output_type="latent",
               **{**SMALL, "num_inference_steps": 1}, context_frames=9)
    assert (out.settings.num_frames, out.settings.context_frames) == (5, 9)
    with pytest.raises(SettingsError) as e:
        GenerationSettings(num_frames=17, context_frames=9).resolve("full")
    assert e.value.render(flag) == ("--context-frames 9 is too short for the default --context-overlap 16 (windows "
                                    "must overlap by less than they hold): pass --context-overlap 4 or less, or a "
                                    "longer window")
    # Given explicitly, an overlap the window cannot hold is refused as before, whatever the clip's length.
    with pytest.raises(SettingsError, match="context_overlap=16 must be under the window's 8 frames"):
        GenerationSettings(num_frames=5, context_frames=9, context_overlap=16)
