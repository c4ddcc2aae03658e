"""`GenerationSettings`: every knob of one generation with its check, help text and flag, in one place.

A knob left `None` takes the variant's default (`lynx.constants.sampling_defaults`); `resolve(variant)` fills
them in. `LynxPipeline.__call__` takes every field as a keyword argument, resolves them first (so a bad value
fails before anything is computed) and returns the resolved settings with the video; the `lynx generate`
flags are generated from the fields, and every sidecar (`lynx.pipelines.record.GenerationRecord`) records them.

A few knobs stay `None` once resolved, where `None` is itself the meaning (`RESOLVED_NONE`: the low-noise
expert's guidance is the text guidance; the largest face of a photo is used).

Adding a knob: one field here (type, check, help, flag) and its use in `LynxPipeline.__call__`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from ..constants import (
    CONTEXT_BLENDS,
    CONTEXT_OVERLAP_FRAMES,
    DEFAULT_NEGATIVE_PROMPT,
    FRAME_STEP,
    MAX_FPS,
    MAX_FRAMES,
    MAX_SIDE,
    MAX_STEPS,
    MIN_FPS,
    SAMPLING_PRESETS,
    SEED_LIMIT,
    SIDE_STEP,
    TWO_WAY,
)
from ..errors import SettingsError, option

# Video-size problems are reported together, in this order.
_SIZE = ("num_frames", "height", "width")

# Defaults that do not depend on the variant (the authors' sampling: adapters and identity guidance on every step
# and block; Wan's own context window overlap).
FIXED_DEFAULTS: dict[str, Any] = dict(ip_start=0.0, ip_end=1.0, ref_start=0.0, ref_end=1.0, guidance_i_start=0.0,
                                      guidance_i_end=1.0, ref_blocks="all", context_overlap=CONTEXT_OVERLAP_FRAMES,
                                      context_blend="linear")
# Knobs whose resolved value may be None (None is what they mean, see the fields' help).
RESOLVED_NONE = ("guidance_scale_2", "face_index")
# Strength windows: (start, end) pairs of fractions of the denoising steps.
WINDOWS = (("ip_start", "ip_end"), ("ref_start", "ref_end"), ("guidance_i_start", "guidance_i_end"))


class _Problem(ValueError):
    """One invalid value: a message naming the option with `option(...)`."""

    def __init__(self, text: str, size: bool = False):
        super().__init__(text)
        self.size = size


# ----- checks: each takes the given value, returns it normalised or raises a _Problem -------------------------
def _whole(value, name: str, lowest: int | None = None) -> int:
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        near = sorted({n for n in (math.floor(value), math.ceil(value)) if lowest is None or n >= lowest})
        hint = f" (try {' or '.join(map(str, near))})" if near else ""
        raise _Problem(f"{option(name, value)} must be a whole number{hint}")
    kind = "" if isinstance(value, Real) and not isinstance(value, bool) else f", not {type(value).__name__}"
    raise _Problem(f"{option(name, value)} must be a whole number{kind}")


def _at_most(n: int, limit: int, name: str, info: ValidationInfo, size: bool = False) -> int:
    if n > limit and info.data.get("allow_large") is not True:
        raise _Problem(f"{option(name, n)} is above the limit of {limit} (try {limit}, or pass "
                       f"{option('allow_large', True)} to go higher on purpose)", size)
    return n


def _side(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, SIDE_STEP)
    if n < SIDE_STEP or n % SIDE_STEP:
        lo = max(SIDE_STEP, n // SIDE_STEP * SIDE_STEP)
        raise _Problem(f"{option(name, n)} is not a positive multiple of {SIDE_STEP} (try {lo} or {lo + SIDE_STEP})",
                       size=True)
    return _at_most(n, MAX_SIDE, name, info, size=True)


def _frames(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, 1)
    if n < 1 or (n - 1) % FRAME_STEP:
        lo = max(1, (n - 1) // FRAME_STEP * FRAME_STEP + 1)
        raise _Problem(f"{option(name, n)} is not {FRAME_STEP}k+1 (try {lo} or {lo + FRAME_STEP})", size=True)
    return _at_most(n, MAX_FRAMES, name, info, size=True)


def _steps(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, 1)
    if n < 1:
        raise _Problem(f"{option(name, n)} must be at least 1 (try 1)")
    return _at_most(n, MAX_STEPS, name, info)


def _seed(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, 0)
    if not 0 <= n < SEED_LIMIT:
        raise _Problem(f"{option(name, n)} must be in [0, 2**63) (try {0 if n < 0 else SEED_LIMIT - 1})")
    return n


def _fps(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, MIN_FPS)
    if not MIN_FPS <= n <= MAX_FPS:
        raise _Problem(f"{option(name, n)} must be between {MIN_FPS} and {MAX_FPS} "
                       f"(try {min(max(n, MIN_FPS), MAX_FPS)})")
    return n


def _scale(value, info: ValidationInfo) -> float | None:
    if value is None:
        return None
    name = info.field_name
    if not isinstance(value, Real) or isinstance(value, bool):
        raise _Problem(f"{option(name, value)} must be a number, not {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise _Problem(f"{option(name, value)} must be a finite number")
    if x < 0:
        raise _Problem(f"{option(name, value)} must be at least 0 (try 0)")
    return x


def _identity_scale(value, info: ValidationInfo) -> float | str | None:
    if value == TWO_WAY:
        return TWO_WAY
    if isinstance(value, str):
        raise _Problem(f"{option(info.field_name, value)} must be a number (three-way guidance) or "
                       f"{TWO_WAY!r} (no identity branch)")
    return _scale(value, info)


def _text(value, info: ValidationInfo) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Problem(f"{option(info.field_name, value)} must be text, not {type(value).__name__}")
    return value


def _fraction(value, info: ValidationInfo) -> float | None:
    x = _scale(value, info)
    if x is not None and x > 1:
        raise _Problem(f"{option(info.field_name, value)} is a fraction of the denoising steps, 0 to 1 (try 1)")
    return x


def _blocks(value, info: ValidationInfo) -> str | None:
    """"0-20,35-39", "all" or block numbers -> the canonical text; the blocks' range is checked by the pipeline,
    which knows the transformer."""
    if value is None:
        return None
    name = info.field_name
    if not isinstance(value, str):
        try:
            value = ",".join(str(_whole(b, name)) for b in value)
        except TypeError:
            raise _Problem(f"{option(name, value)} must be text like \"0-20,35-39\" or block numbers") from None
    if value.strip().lower() in ("", "all"):
        return "all"
    parts = []
    for part in value.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())) or (sep and int(hi) < int(lo)):
            raise _Problem(f"{option(name, value)}: {part.strip()!r} is not a block or a range like 0-20 "
                           "(write e.g. \"0-20,35-39\", or all)")
        parts.append(f"{int(lo)}-{int(hi)}" if sep else str(int(lo)))
    return ",".join(parts)


def _overlap(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    name, n = info.field_name, _whole(value, info.field_name, 0)
    if n < 0 or n % FRAME_STEP:
        lo = max(0, n // FRAME_STEP * FRAME_STEP)
        raise _Problem(f"{option(name, n)} must be a multiple of {FRAME_STEP}, at least 0 (try {lo} or "
                       f"{lo + FRAME_STEP})")
    return n


def _blend(value, info: ValidationInfo) -> str | None:
    if value is not None and value not in CONTEXT_BLENDS:
        raise _Problem(f"{option(info.field_name, value)} must be one of {', '.join(CONTEXT_BLENDS)}")
    return value


def _face_index(value, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    n = _whole(value, info.field_name, 0)
    if n < 0:
        raise _Problem(f"{option(info.field_name, n)} must be 0 or more (0 = the largest face)")
    return n


def _switch(value, info: ValidationInfo) -> bool:
    if not isinstance(value, bool):
        raise _Problem(f"{option(info.field_name, value)} must be True or False")
    return value


def _knob(help: str, flag: str | None = None, default: Any = None):
    """A field's default, help text and (when it differs from the field's name) its short command-line flag."""
    return Field(default=default, description=help, json_schema_extra={"flag": flag} if flag else None)


class GenerationSettings(BaseModel):
    """The prompt-independent knobs of one generation, by the pipeline's argument names; `None` is the variant's
    default. Frozen, unknown names refused, every value checked on construction (`SettingsError`, one line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # First: the limits that the fields below check depend on it.
    allow_large: Annotated[bool, BeforeValidator(_switch)] = _knob(
        f"lift the limits on steps ({MAX_STEPS}), frames ({MAX_FRAMES}) and sides ({MAX_SIDE}), on purpose",
        default=False)
    negative_prompt: Annotated[str | None, BeforeValidator(_text)] = _knob(
        "what the video should not show (default: the authors' negative prompt)")
    height: Annotated[int | None, BeforeValidator(_side)] = _knob(f"video height in pixels, a multiple of {SIDE_STEP}")
    width: Annotated[int | None, BeforeValidator(_side)] = _knob(f"video width in pixels, a multiple of {SIDE_STEP}")
    num_frames: Annotated[int | None, BeforeValidator(_frames)] = _knob(f"frames, {FRAME_STEP}k+1", "--frames")
    num_inference_steps: Annotated[int | None, BeforeValidator(_steps)] = _knob("denoising steps", "--steps")
    guidance_scale: Annotated[float | None, BeforeValidator(_scale)] = _knob(
        "text guidance scale g; 1 or less turns text guidance off", "--guidance")
    guidance_scale_i: Annotated[float | Literal[TWO_WAY] | None, BeforeValidator(_identity_scale)] = _knob(
        f"identity guidance scale g_i (three-way guidance), or {TWO_WAY} (no identity branch)", "--guidance-i")
    ip_scale: Annotated[float | None, BeforeValidator(_scale)] = _knob("strength of the ID-adapter")
    ref_scale: Annotated[float | None, BeforeValidator(_scale)] = _knob(
        "strength of the Ref-adapter (0 skips the reference passes)")
    seed: Annotated[int | None, BeforeValidator(_seed)] = _knob(
        "seed of the initial noise; seed + 1 seeds the reference crop's VAE sample")
    fps: Annotated[int | None, BeforeValidator(_fps)] = _knob(
        f"frame rate of the written video, {MIN_FPS} to {MAX_FPS}")
    # Strength (docs/speed.md): where in the denoising the adapters and identity guidance act.
    ip_start: Annotated[float | None, BeforeValidator(_fraction)] = _knob(
        "fraction of the denoising where the ID-adapter starts acting")
    ip_end: Annotated[float | None, BeforeValidator(_fraction)] = _knob(
        "fraction where it stops (e.g. 0.6: identity only in the first 60% of the steps)")
    guidance_i_start: Annotated[float | None, BeforeValidator(_fraction)] = _knob(
        "identity guidance (3 passes) from this fraction of the steps")
    guidance_i_end: Annotated[float | None, BeforeValidator(_fraction)] = _knob(
        "... up to this one; the other steps run 2 passes")
    ref_start: Annotated[float | None, BeforeValidator(_fraction)] = _knob(
        "fraction of the denoising where the Ref-adapter starts acting")
    ref_end: Annotated[float | None, BeforeValidator(_fraction)] = _knob("fraction where it stops")
    ref_blocks: Annotated[str | None, BeforeValidator(_blocks)] = _knob(
        'transformer blocks where the Ref-adapter acts, e.g. "0-20,35-39"')
    # Wan2.2 A14B bases.
    guidance_scale_2: Annotated[float | None, BeforeValidator(_scale)] = _knob(
        "Wan2.2 A14B: text guidance of the low-noise expert's steps (default: the text guidance)", "--guidance-2")
    # Long videos (docs/wan22.md): frames beyond one window are denoised in overlapping windows.
    context_frames: Annotated[int | None, BeforeValidator(_frames)] = _knob(
        f"long videos: frames per context window, {FRAME_STEP}k+1 (--frames beyond it makes a long video)")
    context_overlap: Annotated[int | None, BeforeValidator(_overlap)] = _knob(
        f"long videos: frames shared by neighbouring windows, a multiple of {FRAME_STEP}")
    context_blend: Annotated[Literal[CONTEXT_BLENDS] | None, BeforeValidator(_blend)] = _knob(  # type: ignore[valid-type]
        "long videos: how overlapping windows combine: linear ramps or a plain average (uniform)")
    # How the photo's face is chosen and how a step runs; the frames do not depend on batch_branches.
    face_index: Annotated[int | None, BeforeValidator(_face_index)] = _knob(
        "which face in a photo with several: 0 = the largest (default: the largest, with a warning when there "
        "are several)")
    batch_branches: Annotated[bool, BeforeValidator(_switch)] = _knob(
        "run a step's guidance branches as one batched call (more memory; off under guidance parallelism)",
        default=False)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise settings_error(e) from None

    @model_validator(mode="after")
    def _windows(self):
        for start, end in WINDOWS:
            a, b = getattr(self, start), getattr(self, end)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{option(start, a)} is after {option(end, b)}: a window of the denoising steps "
                                 "needs start <= end")
        frames, overlap = self.context_frames, self.context_overlap
        if frames is not None and overlap is not None and overlap >= frames - 1:
            raise ValueError(f"{option('context_overlap', overlap)} must be under the window's {frames - 1} frames "
                             f"(try {max(0, (frames - 2) // FRAME_STEP * FRAME_STEP)})")
        return self

    @property
    def two_way(self) -> bool:
        """Resolved settings: True when the identity branch is off (u + g (c - u))."""
        return self.guidance_scale_i == TWO_WAY

    def resolve(self, variant: str) -> GenerationSettings:
        """These settings with every knob left `None` filled from `variant`'s defaults ("full" or "lite")."""
        if variant not in SAMPLING_PRESETS:
            raise SettingsError(f"variant must be one of {', '.join(SAMPLING_PRESETS)}, not {variant!r}")
        values = {name: default(variant, name) if getattr(self, name) is None else getattr(self, name)
                  for name in GenerationSettings.model_fields}
        window, overlap = values["context_frames"], values["context_overlap"]
        if self.context_overlap is None and overlap >= window - 1:  # the default overlap, in a short window
            fit = max(0, (window - 2) // FRAME_STEP * FRAME_STEP)
            if values["num_frames"] > window:
                raise SettingsError(f"{option('context_frames', window)} is too short for the default "
                                    f"{option('context_overlap', overlap)} (windows must overlap by less than they "
                                    f"hold): pass {option('context_overlap', fit)} or less, or a longer window")
            values["context_overlap"] = fit  # one window: nothing overlaps, the value only has to be valid
        return GenerationSettings(**values)

    def given(self) -> dict[str, Any]:
        """The knobs set (not None, not off): what overrides a preset."""
        return {k: v for k, v in self.model_dump().items() if v is not None and v is not False}

    def cli_args(self) -> list[str]:
        """These settings as `lynx generate` flags; unset knobs and values every variant has by default are left out."""
        args: list[str] = []
        for name in GenerationSettings.model_fields:
            value = getattr(self, name)
            if value is None or value is False or (name == "negative_prompt" and value == DEFAULT_NEGATIVE_PROMPT):
                continue
            if FIXED_DEFAULTS.get(name, ...) == value:  # the same for every variant: no need to say it
                continue
            if name == "context_frames" and self.num_frames is not None and value >= self.num_frames:
                continue  # one window: a plain clip
            args += [flag(name)] if value is True else [flag(name), str(value)]
        return args


def default(variant: str, name: str) -> Any:
    """Knob `name`'s value when left unset, for `variant`: None only for the `RESOLVED_NONE` knobs."""
    config = SAMPLING_PRESETS[variant]
    if hasattr(config, name):
        return getattr(config, name)
    if name == "context_frames":  # one window is the model's own clip length
        return config.num_frames
    return FIXED_DEFAULTS.get(name)


# ----- what front ends need to present the fields ---------------------------------------------------------------
def flag(name: str) -> str:
    """The command-line flag of a knob: its short form where it has one (`--steps`), else `--field-name`."""
    extra = GenerationSettings.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def flags(name: str) -> list[str]:
    """The flag, then the field's own name as a flag when that differs (`--steps`, `--num-inference-steps`)."""
    long = "--" + name.replace("_", "-")
    return [flag(name)] + ([long] if long != flag(name) else [])


def help_text(name: str) -> str:
    """The field's help with its defaults for both variants (`default 81 full, 121 lite`)."""
    text = GenerationSettings.model_fields[name].description or ""
    values = {v: default(v, name) for v in SAMPLING_PRESETS}
    if name == "negative_prompt" or "(default" in text or any(v is None or v is False for v in values.values()):
        return text
    shown = set(values.values())
    said = str(next(iter(shown))) if len(shown) == 1 else ", ".join(f"{v} {k}" for k, v in values.items())
    return f"{text} (default {said})"


def parse_text(name: str, text: str) -> Any:
    """A value a person typed for knob `name` (a flag, a form field) -> a Python value. Text that is not a number
    stays text, so the check names the problem (`--steps many must be a whole number, not str`)."""
    if str in get_args(GenerationSettings.model_fields[name].annotation) or text.strip() == TWO_WAY:
        return text.strip() if text.strip() == TWO_WAY else text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def settings_error(error: ValidationError) -> SettingsError:
    """pydantic's report -> one line: the video-size problems together (`invalid video size: ...`), then the rest."""
    size, other = [], []
    for e in error.errors():
        problem, name = (e.get("ctx") or {}).get("error"), ".".join(map(str, e["loc"]))
        if isinstance(problem, _Problem) and problem.size:
            size.append((_SIZE.index(name) if name in _SIZE else len(_SIZE), str(problem)))
        elif isinstance(problem, _Problem) or (isinstance(problem, ValueError) and not e["loc"]):
            other.append(str(problem))
        elif e["type"] == "extra_forbidden":
            other.append(f"unknown setting {name!r} (known: {', '.join(GenerationSettings.model_fields)})")
        else:
            other.append(f"{name}: {e['msg']}")
    parts = (["invalid video size: " + "; ".join(text for _, text in sorted(size))] if size else []) + other
    return SettingsError("; ".join(parts))
