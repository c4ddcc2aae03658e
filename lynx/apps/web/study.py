"""`lynx study DIR`: a blind rating page over videos, the paper's human study (Table 3).

Each rater gives a name once per visit, then sees every video of DIR in an order of their own (shuffled by
their name, so a returning rater continues where they stopped), with the reference photo and the prompt but
never the method or the file name, and rates it 1-5 on face resemblance (FR), prompt following (PF),
aesthetics (AQ), motion naturalness (MN) and overall quality (VQ). Ratings go to SQLite, one row per
(rater, video), each a single statement, so several raters can rate at once and a restart loses nothing.
The results table has one row per method, in Table 3's layout.

Videos are found as `DIR/<method>/**/<case>.<mp4|webp|gif>` (a `lynx bench` output directory: its
`videos/<setting>/...`), never in the photo folders lynx writes (`photos/`, `faces/`, `references/`); the
prompt comes from each video's sidecar, the reference photo from the sidecar's photo or the bench run's
`references/<subject>.*`. A video whose sidecar is there but unusable (unreadable, not JSON, a prompt that is
not text) is skipped with a note, not rated without its prompt.
"""

from __future__ import annotations

import atexit
import json
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ...errors import InputError, LynxError
from ...io.files import atomic_write
from ...io.video import VIDEO_FORMATS, sidecar_path

DIMENSIONS = {
    "FR": ("Face resemblance", "Is this the person in the reference photo?"),
    "PF": ("Prompt following", "Does the video show what the prompt asks for?"),
    "AQ": ("Aesthetics", "Is it pleasing to look at: composition, lighting, colour?"),
    "MN": ("Motion naturalness", "Do people and things move as they would in reality?"),
    "VQ": ("Overall video quality", "Taken as a whole, how good is the video?"),
}
# Folders of photos that lynx writes beside videos: `lynx serve`'s uploads and saved identities, `lynx bench`'s
# references. A photo there can be a .webp, which is also a video format, and a one-frame WebP video cannot be
# told from a photo (Pillow writes a video whose frames are all alike as one still frame): the folder decides.
PHOTO_FOLDERS = ("photos", "faces", "references")
SCHEMA = ("CREATE TABLE IF NOT EXISTS ratings (rater TEXT NOT NULL, item TEXT NOT NULL, method TEXT NOT NULL, "
          + ", ".join(f"{d.lower()} INTEGER NOT NULL CHECK ({d.lower()} BETWEEN 1 AND 5)" for d in DIMENSIONS)
          + ", rated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (rater, item))")


@dataclass(frozen=True)
class Item:
    """One video to rate. `key` (its path under the root) identifies it in the database; raters never see it."""

    key: str
    method: str
    path: Path
    prompt: str | None
    reference: Path | None


def read_sidecar(video: Path) -> tuple[str | None, list[str]]:
    """The prompt and photo paths in a video's sidecar (None and [] without one). Any JSON object with these
    fields will do, not only a lynx record: other methods' videos come with sidecars of their own. One that is
    there but unusable raises InputError saying what is wrong with it."""
    side = sidecar_path(video)
    if not side.exists():
        return None, []
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"its sidecar {side.name} cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise InputError(f"its sidecar {side.name} is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise InputError(f"its sidecar {side.name} is not a JSON object")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"its sidecar {side.name} has a prompt that is not text")
    identity = record.get("identity") or {}
    images = identity.get("images") or [] if isinstance(identity, dict) else None
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("path", ""), str)
                                               for i in images):
        raise InputError(f"its sidecar {side.name} has identity.images that are not a list of {{\"path\": ...}}")
    return prompt, [i.get("path", "") for i in images]


def _is_file(path) -> bool:
    try:
        return bool(path) and Path(path).is_file()
    except (OSError, ValueError):  # a path with a NUL byte, or one too long, names no photo
        return False


def _reference(directory: Path, case: str, photos: list[str]) -> Path | None:
    for photo in photos:
        if _is_file(photo):
            return Path(photo)
    found = sorted((directory / "references").glob(f"{case.split('__')[0]}.*"))
    return found[0] if found else None


def find_items(directory: Path) -> tuple[list[Item], list[str]]:
    """The videos to rate, and a note for each one skipped for its sidecar."""
    root = directory / "videos" if (directory / "videos").is_dir() else directory
    items, skipped = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix.lower() not in VIDEO_FORMATS or not path.is_file() or path.stat().st_size == 0 \
                or any(part.startswith(".") for part in rel.parts) \
                or any(part in PHOTO_FOLDERS for part in rel.parts[:-1]):
            continue
        try:
            prompt, photos = read_sidecar(path)
        except InputError as e:
            skipped.append(f"{rel.as_posix()}: {e}")
            continue
        method = rel.parts[0] if len(rel.parts) > 1 else root.name
        items.append(Item(rel.as_posix(), method, path, prompt, _reference(directory, path.stem, photos)))
    return items, skipped


class Study:
    """The videos of a directory and the ratings database. Thread-safe: one connection per call."""

    def __init__(self, directory: Path, db: Path | None = None):
        self.root = Path(directory)
        if not self.root.is_dir():
            raise InputError(f"{self.root} is not a directory of videos")
        items, self.skipped = find_items(self.root)
        self.items = {item.key: item for item in items}
        if not self.items and self.skipped:
            raise InputError(f"no usable videos under {self.root}: {len(self.skipped)} skipped for their sidecars, "
                             f"e.g. {self.skipped[0]}; fix or delete those sidecars")
        if not self.items:
            raise InputError(f"no videos (.mp4, .webp, .gif) under {self.root}; expected <dir>/<method>/<video>")
        self.methods = sorted({item.method for item in self.items.values()})
        self.db = Path(db) if db else self.root / "study.sqlite"
        self._open_db()
        # Raters get copies under random names: neither the page nor a URL tells the method.
        self.clips = Path(tempfile.mkdtemp(prefix="lynx-study-"))
        atexit.register(shutil.rmtree, self.clips, True)
        self.tokens = {key: secrets.token_hex(8) for key in self.items}
        self._copying = threading.Lock()

    def _open_db(self) -> None:
        """Create the ratings table, or check the one there; the file's folder is made when missing."""
        if self.db.is_dir():
            raise InputError(f"{self.db} is a folder; --db names the ratings file, e.g. {self.db / 'study.sqlite'}")
        try:
            header = b""
            if self.db.exists():
                with open(self.db, "rb") as f:
                    header = f.read(16)
            # SQLite opens any file and says "file is not a database" only at the first statement; an empty file
            # is a new database to it.
            if header and header != b"SQLite format 3\0":
                raise InputError(f"{self.db} exists and is not a SQLite database; give --db a new file or a "
                                 "study's ratings file")
            self.db.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as c:
                c.execute("PRAGMA journal_mode=WAL")  # raters read while another writes
                c.execute(SCHEMA)
                columns = {row[1] for row in c.execute("PRAGMA table_info(ratings)")}
        except (OSError, sqlite3.Error) as e:
            raise InputError(f"cannot keep the ratings in {self.db} ({e}); give --db a file in a folder you can "
                             "write") from None
        if not {"rater", "item", "method", *(d.lower() for d in DIMENSIONS)} <= columns:
            raise InputError(f"{self.db} has a ratings table that is not lynx study's; give --db another file")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db, timeout=60, isolation_level=None)  # autocommit: each statement is atomic

    def clip(self, item: Item) -> Path:
        path = self.clips / f"{self.tokens[item.key]}{item.path.suffix.lower()}"
        # Two raters can ask for the same video at once: one copies, and the name appears only when whole (a
        # second copy over the first truncated it while the server was still sending it).
        with self._copying:
            if not path.exists():
                atomic_write(path, lambda tmp: shutil.copyfile(item.path, tmp))
        return path

    def reference_photo(self, item: Item) -> Path | None:
        """The item's reference photo as a PNG under the item's random name, or None when there is none or it
        cannot be read (the page says it is missing; the terminal says why, the page never names the file: its
        path can tell the method). A file, not an array: Gradio rewrites an array's cached image in place on every
        request, so a second rater asking for the same photo cut the first one's download short."""
        from PIL import Image

        from ...face import load_image

        if item.reference is None:
            return None
        path = self.clips / f"{self.tokens[item.key]}-photo.png"
        with self._copying:
            if not path.exists():
                try:
                    rgb = load_image(item.reference)
                except LynxError as e:
                    print(f"lynx study: the reference photo of {item.key} is shown as missing: {e}", file=sys.stderr)
                    return None
                atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
        return path

    def next_item(self, rater: str) -> tuple[Item | None, int]:
        """The rater's next unrated video in their own order, and how many they have rated."""
        with self._connect() as c:
            done = {row[0] for row in c.execute("SELECT item FROM ratings WHERE rater = ?", (rater,))}
        order = sorted(self.items)
        random.Random(rater).shuffle(order)
        todo = [key for key in order if key not in done]
        return (self.items[todo[0]] if todo else None), len(done & set(self.items))

    def rate(self, rater: str, key: str, scores: dict[str, int]) -> None:
        if key not in self.items:
            raise InputError("that video is not part of this study")
        if set(scores) != set(DIMENSIONS) or any(s not in (1, 2, 3, 4, 5) for s in scores.values()):
            raise InputError("rate all five questions from 1 (poor) to 5 (excellent)")
        columns = [d.lower() for d in DIMENSIONS]
        with self._connect() as c:
            c.execute(f"INSERT INTO ratings (rater, item, method, {', '.join(columns)}) VALUES (?, ?, ?"
                      f"{', ?' * len(columns)}) ON CONFLICT (rater, item) DO UPDATE SET "
                      + ", ".join(f"{col} = excluded.{col}" for col in columns) + ", rated_at = CURRENT_TIMESTAMP",
                      (rater, key, self.items[key].method, *(int(scores[d]) for d in DIMENSIONS)))

    def results(self) -> list[dict]:
        """Per method: the mean of each dimension, the number of ratings and of raters."""
        means = ", ".join(f"AVG({d.lower()})" for d in DIMENSIONS)
        with self._connect() as c:
            rows = c.execute(f"SELECT method, {means}, COUNT(*), COUNT(DISTINCT rater) FROM ratings "
                             "GROUP BY method ORDER BY method").fetchall()
        return [{"method": r[0], **dict(zip(DIMENSIONS, r[1:6])), "ratings": r[6], "raters": r[7]} for r in rows]

    def results_markdown(self) -> str:
        """Table 3's layout: one row per method, the best score in bold and the second best underlined."""
        rows = self.results()
        if not rows:
            return "No ratings yet."
        marks = {}
        for d in DIMENSIONS:
            ranked = sorted({r[d] for r in rows}, reverse=True)
            marks[d] = {ranked[0]: "**{}**", **({ranked[1]: "<u>{}</u>"} if len(ranked) > 1 else {})}
        lines = ["| Methods | " + " | ".join(DIMENSIONS) + " | ratings | raters |",
                 "| --- |" + " ---: |" * (len(DIMENSIONS) + 2)]
        for r in rows:
            cells = [marks[d].get(r[d], "{}").format(f"{r[d]:.2f}") for d in DIMENSIONS]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['ratings']} | {r['raters']} |")
        legend = ", ".join(f"{d}: {name.lower()}" for d, (name, _) in DIMENSIONS.items())
        return "\n".join(lines) + f"\n\n{legend}; mean of 1-5 ratings."


def build_study_page(study: Study) -> gr.Blocks:
    """Name once, then one video at a time with the five questions; results in their own tab."""
    with gr.Blocks(title="Lynx study", analytics_enabled=False) as page:
        gr.Markdown(f"# Rate {len(study.items)} videos\nEach video was made from the reference photo and the "
                    "prompt. Rate it on the five questions, from 1 (poor) to 5 (excellent). The method is hidden.")
        rater, current = gr.State(""), gr.State("")
        with gr.Tab("Rate"):
            with gr.Row():
                name = gr.Textbox(label="Your name (once per visit)", elem_id="rater", scale=3)
                start = gr.Button("Start", variant="primary", scale=1)
            progress = gr.Markdown()
            with gr.Row():
                reference = gr.Image(label="Reference photo", type="filepath", interactive=False, height=300)
                with gr.Column(scale=2):
                    prompt = gr.Markdown()
                    video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, height=400)
                    image = gr.Image(label="Video", type="filepath", interactive=False, visible=False)
            radios = [gr.Radio([1, 2, 3, 4, 5], label=f"{name_} ({d})", info=question, elem_id=f"rate-{d}")
                      for d, (name_, question) in DIMENSIONS.items()]
            submit = gr.Button("Submit and next", variant="primary")
        with gr.Tab("Results"):
            table = gr.Markdown()
            show = gr.Button("Show the results")
        shown = [current, progress, prompt, reference, video, image, *radios]

        def present(who: str):
            item, done = study.next_item(who)
            total = f"{done} of {len(study.items)} rated"
            if item is None:
                return ["", f"**All done, thank you, {who}.** {total}.", "", None, gr.update(value=None),
                        gr.update(value=None)] + [None] * len(radios)
            is_mp4 = item.path.suffix.lower() == ".mp4"
            clip = str(study.clip(item))
            photo = study.reference_photo(item)
            photo = None if photo is None else str(photo)
            return [item.key, f"**{who}**: {total}.",
                    (f"**Prompt:** {item.prompt}" if item.prompt else "*(no prompt was recorded for this video)*")
                    + ("" if photo is not None else "\n\n*(the reference photo is missing)*"),
                    photo,
                    gr.update(value=clip if is_mp4 else None, visible=is_mp4),
                    gr.update(value=None if is_mp4 else clip, visible=not is_mp4)] + [None] * len(radios)

        def begin(who: str, name_now: str):
            who = who or (name_now or "").strip()[:64]
            if not who:
                raise gr.Error("type your name first: it keeps your ratings together")
            return [who, gr.update(value=who, interactive=False), *present(who)]

        def rate(who: str, key: str, fr: int, pf: int, aq: int, mn: int, vq: int):
            if not who:
                raise gr.Error("type your name and press Start first")
            if key:
                try:
                    study.rate(who, key, dict(zip(DIMENSIONS, (fr, pf, aq, mn, vq))))
                except LynxError as e:
                    raise gr.Error(str(e), print_exception=False) from None
            return present(who)

        start.click(begin, [rater, name], [rater, name, *shown], api_name="start")
        submit.click(rate, [rater, current, *radios], shown, api_name="rate")
        show.click(study.results_markdown, None, table, api_name="results")
    return page
