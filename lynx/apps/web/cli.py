"""`lynx serve` and `lynx study`: the Gradio pages, registered into the `lynx` command through COMMAND_MODULES."""

from __future__ import annotations

import argparse
import inspect
import socket
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port(host: str) -> int:
    """A port nobody listens on now (Gradio itself takes no port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_page(page, host: str = "127.0.0.1", port: int = 0, *, share: bool = False, allowed: list[Path] = (),
              max_upload_mb: int = 25) -> str:
    """Queue and serve a page on host:port (0: a free port) in the background; returns its URL. Only the
    `allowed` directories are served besides Gradio's own cache; uploads above `max_upload_mb` are refused."""
    import gradio as gr

    from ...errors import InputError

    page.queue(default_concurrency_limit=4)
    try:
        _, url, share_url = page.launch(
            server_name=host, server_port=port or free_port(host), share=share, allowed_paths=[str(p) for p in allowed],
            max_file_size=f"{max_upload_mb}mb", ssr_mode=False, quiet=True, prevent_thread_lock=True,
            footer_links=["api"], theme=gr.themes.Soft())
    except OSError:
        raise InputError(f"cannot listen on {host}:{port}: the port is taken or not allowed; pick another --port "
                         "(0 picks a free one)") from None
    return share_url or url


def serve_until_stopped(page, args, what: str, allowed: list[Path]) -> None:
    """`open_page` with the command's --host/--port/--share, then block until Ctrl+C."""
    if args.host not in LOOPBACK or args.share:
        where = "a public gradio.live link" if args.share else args.host
        print(f"lynx {what}: listening on {where}: anyone who can reach it can use this page", file=sys.stderr)
    url = open_page(page, args.host, args.port, share=args.share, allowed=allowed, max_upload_mb=args.max_upload_mb)
    # Tests and scripts read this line to find the page.
    print(f"lynx {what}: open {url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        page.block_thread()
    finally:
        print(f"lynx {what}: stopped", file=sys.stderr)


def _model_actions() -> list[argparse.Action]:
    from ..options import add_model_options

    parser = argparse.ArgumentParser(add_help=False)
    add_model_options(parser)
    return [a for a in parser._actions if a.option_strings]


# The record's command writes these itself (the resolved directories, the dtype and device the model ran on).
RECORDED_FLAGS = {"base", "adapter", "dtype", "device"}
# Options naming a file or folder: the command runs from any folder, so they are written absolute.
PATH_FLAGS = {"base_transformer", "base_transformer_2", "face_models", "safety_model"}


def model_flags(args) -> list[str]:
    """The model options `serve` was given, as flags `lynx generate` takes (both use add_model_options)."""
    flags = []
    for action in _model_actions():
        value = getattr(args, action.dest, action.default)
        if value != action.default and action.dest not in RECORDED_FLAGS:
            value = str(Path(value).resolve()) if action.dest in PATH_FLAGS else str(value)
            flags += [action.option_strings[-1]] + ([] if action.nargs == 0 else [value])
    return flags


def load_options(args) -> dict:
    """The model options that `load_pipeline` takes, as its keywords: a model option added for `generate` reaches
    `serve` with no change here."""
    from ..options import load_pipeline

    # Keyword-only: the base and adapter directories travel in ServeConfig itself.
    accepted = {n for n, p in inspect.signature(load_pipeline).parameters.items() if p.kind is p.KEYWORD_ONLY}
    return {a.dest: getattr(args, a.dest) for a in _model_actions() if a.dest in accepted}


def upload_mb(text: str) -> int:
    """The upload limit in MB: a whole number, at least 1 (0 would refuse every photo)."""
    try:
        mb = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MB (default 25)") from None
    if mb < 1:
        raise argparse.ArgumentTypeError(f"{mb} MB accepts no upload; give at least 1 (default 25)")
    return mb


def port_number(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535; 0 picks a free port)")
    return port


def cmd_serve(args) -> int:
    from ...io.files import check_writable
    from ...runtime import check_attention_backend, default_adapter_dir, default_base_dir, device_and_dtype
    from .app import LynxWebApp, ServeConfig, build_page

    # The machine and the output folder are checked before the port is bound or anything loads.
    device_and_dtype(args.device, args.dtype)
    if args.attention_backend:
        check_attention_backend(args.attention_backend)
    check_writable(Path(args.out_dir) / "photos" / "probe", flag="--out-dir")
    from ..options import check_speed_options, memory_choice

    loras = check_speed_options(args.speed, args.lora, args.compile, memory_choice(args.memory, args.offload))

    config = ServeConfig(
        base=Path(args.base or default_base_dir()), adapter=Path(args.adapter or default_adapter_dir(args.variant)),
        out_dir=Path(args.out_dir), face_models=Path(args.face_models) if args.face_models else None,
        detector=args.detector, model_flags=model_flags(args), load_options=load_options(args),
        safety_check=not args.no_safety_check, safety_model=Path(args.safety_model) if args.safety_model else None,
        speed=args.speed, loras=loras, compile=args.compile, max_upload_mb=args.max_upload_mb)
    app = LynxWebApp(config)
    app.start()
    if app.missing():
        print(f"lynx serve: cannot generate yet; the page shows what to download:\n{app.missing()}\n",
              file=sys.stderr)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stop_on_signals(app.cancel_runs)
    try:
        serve_until_stopped(build_page(app), args, "serve", [config.out_dir])
    finally:
        app.shutdown()  # runs under way stop after their step; no claimed 0-byte file stays behind
    return 0


def stop_on_signals(cancel) -> None:
    """SIGTERM (systemd, docker stop, kill) stops the server as Ctrl+C does, so the same cleanup runs; both
    call `cancel` first, so a generation under way stops after its current step instead of running on (and
    writing its video) while the web server closes."""
    import signal

    def interrupt(signum, frame):
        cancel()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def cmd_study(args) -> int:
    from .study import Study, build_study_page

    study = Study(Path(args.dir), Path(args.db) if args.db else None)
    for note in study.skipped:
        print(f"lynx study: skipped {note}", file=sys.stderr)
    if args.results:
        print(study.results_markdown())
        return 0
    print(f"lynx study: {len(study.items)} videos from {len(study.methods)} methods; ratings in {study.db}",
          file=sys.stderr)
    serve_until_stopped(build_study_page(study), args, "study", [study.root])
    return 0


def _add_server_options(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=port, help=f"default {port}; 0 picks a free port")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--max-upload-mb", type=upload_mb, default=25, help="largest accepted upload (default 25 MB)")


def register(subparsers) -> None:
    from ..options import add_model_options, add_speed_options

    s = subparsers.add_parser("serve", help="a web page: photos, face check, prompt, settings, generate, gallery")
    add_model_options(s)
    add_speed_options(s)  # for every request: the page's settings start from the preset's values
    s.add_argument("--out-dir", default="outputs",
                   help="videos and sidecars; uploaded photos go to photos/, saved identities to faces/")
    _add_server_options(s, 7860)
    s.set_defaults(func=cmd_serve)

    t = subparsers.add_parser("study", help="a blind rating page over the videos in a directory (or a bench run)")
    t.add_argument("dir", help="videos in <dir>/<method>/..., or a `lynx bench` output directory")
    t.add_argument("--db", help="SQLite file of the ratings (default <dir>/study.sqlite)")
    t.add_argument("--results", action="store_true", help="print the results table (Table 3 layout) and exit")
    _add_server_options(t, 7861)
    t.set_defaults(func=cmd_study)
