"""Evaluation of identity fidelity and video quality, as in the Lynx paper, on any subjects and prompts.

    from lynx.evaluation import evaluate_video
    result = evaluate_video("out.mp4", "me.jpg", every=2)
    result.recognizers["dlib"]["mean"], result.face_found_share

Modules: ``recognizers`` (facexlib ArcFace, insightface, dlib), ``metrics`` (per-frame similarity,
summaries), ``bench`` (manifest -> generation -> scores, resumable and shardable), ``judge`` (PF/AQ/MN/VQ
from a multimodal model over HTTP), ``report`` (tables, plots, HTML). See docs/evaluation.md.
"""

from .bench import Case, Manifest, Prompt, Setting, Subject, load_manifest, run
from .judge import METRICS, Judge, JudgeConfig, JudgeError, parse_answer
from .metrics import FaceEvaluator, Reference, VideoEvaluation, evaluate_video, summarize
from .recognizers import RECOGNIZERS, Recognizer, load_recognizer, load_recognizers

__all__ = ["Case", "FaceEvaluator", "Judge", "JudgeConfig", "JudgeError", "METRICS", "Manifest", "Prompt",
           "RECOGNIZERS", "Recognizer", "Reference", "Setting", "Subject", "VideoEvaluation", "evaluate_video",
           "load_manifest", "load_recognizer", "load_recognizers", "parse_answer", "run", "summarize"]
