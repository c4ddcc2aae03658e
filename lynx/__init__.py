"""Lynx: personalized video generation on Wan2.1 with the released ID- and Ref-adapters.

    from lynx import LynxPipeline
    pipe = LynxPipeline.from_pretrained("models/Wan2.1-T2V-14B-Diffusers", adapter="models/lynx_full",
                                        torch_dtype=torch.bfloat16, device="cuda")
    video = pipe("A person carves a pumpkin ...", image="me.jpg").frames[0]
"""

__version__ = "0.1.0"

from .runtime import quiet_import_notices  # noqa: E402

quiet_import_notices()

from .constants import AdapterConfig, ResamplerConfig, SamplingConfig  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    InputError,
    LynxError,
    NoFaceError,
    OutputError,
    ParallelError,
    SettingsError,
    UnsafeVideoError,
    WeightsNotFoundError,
)
from .face import FaceAnalyzer, FaceIdentity  # noqa: E402
from .models.adapters import Conditioning, LynxAttnProcessor  # noqa: E402
from .models.resampler import Resampler  # noqa: E402
from .pipelines.parallel import parallelize  # noqa: E402
from .pipelines.pipeline_lynx import LynxPipeline  # noqa: E402
from .pipelines.settings import GenerationSettings  # noqa: E402

__all__ = ["LynxPipeline", "GenerationSettings", "parallelize", "LynxAttnProcessor", "Conditioning", "FaceAnalyzer",
           "FaceIdentity", "Resampler", "AdapterConfig", "ResamplerConfig", "SamplingConfig", "LynxError",
           "InputError", "SettingsError", "OutputError", "CheckpointError", "NoFaceError", "ParallelError",
           "UnsafeVideoError", "WeightsNotFoundError"]
