"""`lynx study`: two raters at once through gradio_client, blindness, their own orders, the results table
against hand-computed means, ratings that survive a restart, concurrent writers on one SQLite file, the CLI."""

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from lynx.apps.web.cli import open_page
from lynx.apps.web.study import Study, build_study_page
from lynx.errors import InputError
from lynx.io.video import save_video, sidecar_path

REPO = Path(__file__).resolve().parent.parent
# Gradio's queue statistics use pandas options that pandas 3 deprecates: not ours to fix, and noisy.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
PROMPTS = {"beach": "a person walks on the beach", "rain": "a person dances in the rain",
           "park": "a person runs in the park"}
# What each rater gives each method: (FR, PF, AQ, MN, VQ).
SCORES = {("alice", "lynx-full"): (5, 4, 4, 3, 5), ("alice", "baseline"): (2, 3, 3, 3, 2),
          ("bob", "lynx-full"): (5, 4, 4, 3, 5), ("bob", "baseline"): (1, 3, 3, 3, 2)}


@pytest.fixture()
def bench_run(tmp_path, photos):
    """A `lynx bench` output directory: videos/<setting>/<subject>__<prompt>.mp4 with sidecars, references/."""
    run = tmp_path / "run"
    for k, method in enumerate(("lynx-full", "baseline")):
        for j, (prompt_id, text) in enumerate(PROMPTS.items()):
            video = run / "videos" / method / f"astro__{prompt_id}.mp4"
            save_video(np.full((5, 32, 48, 3), 40 * k + 10 * j, np.uint8), video, 16)
            # Study pages also rate other methods' videos: a sidecar needs only a prompt, not a lynx record.
            sidecar_path(video).write_text(json.dumps({"prompt": text, "identity": {"images": []}}))
    (run / "references").mkdir()
    (run / "references" / "astro.jpg").write_bytes((photos / "astronaut.jpg").read_bytes())
    return run


@pytest.fixture()
def served(bench_run, tmp_path):
    """Start (and restart) the study page; yields a function returning (study, url)."""
    pages = []

    def start():
        study = Study(bench_run)
        page = build_study_page(study)
        pages.append(page)
        return study, open_page(page, allowed=[study.root])

    yield start
    for page in pages:
        page.close()


def view(outputs):
    """(progress line, prompt, reference photo, video, image) of /start's or /rate's outputs."""
    return outputs[-10:-5]


def rate_everything(url, study, name, downloads, seen):
    """One rater's visit: give the name, then rate every video shown until the page says all done."""
    client = Client(url, verbose=False, download_files=str(downloads))
    by_clip = {token: key for key, token in study.tokens.items()}
    shown = client.predict(name, api_name="/start")
    outputs = [shown]
    while "All done" not in view(shown)[0]:
        clip = Path(view(shown)[3]["value"])
        key = by_clip[clip.stem]  # the test knows the hidden mapping; the page never shows it
        seen[name].append(key)
        assert clip.read_bytes() == study.items[key].path.read_bytes()
        shown = client.predict(*SCORES[(name, study.items[key].method)], api_name="/rate")
        outputs.append(shown)
    return outputs


def test_two_raters_at_once_blind_in_their_own_order_and_the_table(served, bench_run, tmp_path):
    study, url = served()
    assert sorted(study.methods) == ["baseline", "lynx-full"] and len(study.items) == 6
    seen, outputs, errors = {"alice": [], "bob": []}, {}, []

    def visit(name):
        try:
            outputs[name] = rate_everything(url, study, name, tmp_path / name, seen)
        except Exception as e:  # surfaced below, with the rater's name
            errors.append((name, e))

    threads = [threading.Thread(target=visit, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors

    for name in ("alice", "bob"):
        # Every video once, in the rater's own shuffled order (the same on every visit).
        expected = sorted(study.items)
        random.Random(name).shuffle(expected)
        assert seen[name] == expected
        text = json.dumps(outputs[name])
        # Blind: neither a method nor a file name ever reaches the rater.
        assert not any(word in text for word in ("lynx-full", "baseline", "astro__", "videos/"))
        first = outputs[name][0]
        assert first[0] == {"value": name, "interactive": False, "__type__": "update"}
        _, prompt, reference, _, _ = view(first)
        assert prompt.startswith("**Prompt:** a person") and Path(reference).is_file()
        assert view(outputs[name][-1])[0].startswith(f"**All done, thank you, {name}.** 6 of 6 rated")
    assert seen["alice"] != seen["bob"]

    with sqlite3.connect(study.db) as c:
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT rater) FROM ratings").fetchone() == (12, 2)
    rows = {r["method"]: r for r in study.results()}
    assert rows["lynx-full"] == {"method": "lynx-full", "FR": 5.0, "PF": 4.0, "AQ": 4.0, "MN": 3.0, "VQ": 5.0,
                                 "ratings": 6, "raters": 2}
    assert rows["baseline"] == {"method": "baseline", "FR": 1.5, "PF": 3.0, "AQ": 3.0, "MN": 3.0, "VQ": 2.0,
                                "ratings": 6, "raters": 2}
    table = Client(url, verbose=False, download_files=str(tmp_path / "dl")).predict(api_name="/results")
    assert table.splitlines()[:4] == [
        "| Methods | FR | PF | AQ | MN | VQ | ratings | raters |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| baseline | <u>1.50</u> | <u>3.00</u> | <u>3.00</u> | **3.00** | <u>2.00</u> | 6 | 2 |",
        "| lynx-full | **5.00** | **4.00** | **4.00** | **3.00** | **5.00** | 6 | 2 |",
    ]

    # A restart keeps every rating: the table is the same and a returning rater has nothing left to rate.
    study2, url2 = served()
    assert study2.results() == study.results()
    back = Client(url2, verbose=False, download_files=str(tmp_path / "dl2")).predict("alice", api_name="/start")
    assert view(back)[0].startswith("**All done, thank you, alice.** 6 of 6 rated")

    out = subprocess.run([sys.executable, "-m", "lynx", "study", str(bench_run), "--results"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:4] == table.splitlines()[:4]


def test_one_name_per_visit_and_incomplete_ratings_refused(served, tmp_path):
    study, url = served()
    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
    with pytest.raises(AppError, match="type your name first"):
        client.predict("  ", api_name="/start")
    with pytest.raises(AppError, match="type your name and press Start first"):
        client.predict(1, 2, 3, 4, 5, api_name="/rate")
    assert view(client.predict("carol", api_name="/start"))[0] == "**carol**: 0 of 6 rated."
    again = client.predict("mallory", api_name="/start")  # the same visit keeps its first name
    assert again[0]["value"] == "carol" and view(again)[0] == "**carol**: 0 of 6 rated."
    with pytest.raises(AppError, match=r"rate all five questions from 1 \(poor\) to 5 \(excellent\)"):
        client.predict(5, 4, None, 3, 2, api_name="/rate")
    assert view(client.predict(5, 4, 3, 3, 2, api_name="/rate"))[0] == "**carol**: 1 of 6 rated."
    assert [r["ratings"] for r in study.results()] == [1]


def test_a_video_whose_reference_photo_is_unreadable_is_shown_with_the_photo_missing(served, bench_run, tmp_path):
    reference = bench_run / "references" / "astro.jpg"
    reference.write_bytes(reference.read_bytes()[:2000])  # cut off, as an interrupted copy leaves it
    study, url = served()
    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
    progress, prompt, photo, video, _ = view(client.predict("erin", api_name="/start"))
    assert progress == "**erin**: 0 of 6 rated." and photo is None and Path(video["value"]).is_file()
    assert prompt.startswith("**Prompt:** a person") and prompt.endswith("*(the reference photo is missing)*")
    assert "astro" not in prompt  # blind: the page never names the photo
    assert view(client.predict(3, 3, 3, 3, 3, api_name="/rate"))[0] == "**erin**: 1 of 6 rated."


def test_concurrent_writers_on_one_database(bench_run):
    """Two servers on one file (as two `lynx study` processes would be), two threads each, no rating lost."""
    studies = [Study(bench_run), Study(bench_run)]
    keys = sorted(studies[0].items)

    def rate(study, rater):
        for k in range(60):
            study.rate(rater, keys[k % len(keys)], dict(zip(("FR", "PF", "AQ", "MN", "VQ"), (k % 5 + 1,) * 5)))

    threads = [threading.Thread(target=rate, args=(studies[i % 2], f"rater{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with sqlite3.connect(studies[0].db) as c:
        rows = c.execute("SELECT rater, item, fr FROM ratings ORDER BY rater, item").fetchall()
    # Each rater's last rating of each video stands: k = 54..59 rated keys[k % 6] with k % 5 + 1.
    expected = {keys[k % 6]: k % 5 + 1 for k in range(54, 60)}
    assert rows == [(f"rater{i}", key, expected[key]) for i in range(4) for key in sorted(expected)]


def test_a_clip_is_whole_whenever_a_rater_gets_its_name(tmp_path):
    # Many raters asking for the same (large) video at once: every one gets a name whose file is already
    # complete, and no second copy truncates it while it is being served.
    (tmp_path / "m").mkdir()
    video = tmp_path / "m" / "a.mp4"
    video.write_bytes(os.urandom(32 * 2**20))
    study = Study(tmp_path)
    item = next(iter(study.items.values()))
    sizes, names = [], set()

    def ask():
        path = study.clip(item)
        names.add(path)
        sizes.append(path.stat().st_size)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(names) == 1 and sizes == [video.stat().st_size] * 8
    assert next(iter(names)).read_bytes() == video.read_bytes()


def test_a_plain_directory_of_method_folders(tmp_path):
    for method in ("a", "b"):
        save_video(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / method / "clip.webp", 8)
    study = Study(tmp_path, db=tmp_path / "ratings.sqlite")
    assert study.methods == ["a", "b"] and {i.prompt for i in study.items.values()} == {None}
    assert study.db.is_file() and not (tmp_path / "study.sqlite").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no videos"):
        Study(tmp_path / "empty")
    with pytest.raises(InputError, match="is not a directory of videos"):
        Study(tmp_path / "missing")


def test_still_webp_and_gif_photos_are_not_videos(tmp_path):
    """A `lynx serve` output directory: its videos beside photos/ (uploads, kept as .webp among others)."""
    from PIL import Image

    save_video(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / "serve" / "a.webp", 8)
    one = tmp_path / "serve" / "one-frame.webp"  # `lynx generate --frames 1`: a video, as its sidecar says
    save_video(np.zeros((1, 16, 16, 3), np.uint8), one, 8)
    sidecar_path(one).write_text(json.dumps({"prompt": "a portrait"}))
    (tmp_path / "photos").mkdir()
    for name in ("upload.webp", "upload.gif"):
        Image.new("RGB", (16, 16)).save(tmp_path / "photos" / name)
    study = Study(tmp_path)
    assert sorted(study.items) == ["serve/a.webp", "serve/one-frame.webp"] and study.methods == ["serve"]


def test_photo_folders_hold_no_videos_even_as_webp(tmp_path, photos):
    """A `lynx serve` output directory: videos at the top, uploads in photos/ (a WebP photo among them), and a
    plain directory with a references/ folder; a method's one-frame WebP video is still a video."""
    from PIL import Image

    save_video(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / "serve" / "a.webp", 8)  # frames alike: one still
    (tmp_path / "serve" / "photos").mkdir()
    (tmp_path / "references").mkdir()
    for folder in (tmp_path / "serve" / "photos", tmp_path / "references"):
        Image.open(photos / "astronaut.jpg").save(folder / "astro.webp")
        Image.open(photos / "astronaut.jpg").save(folder / "astro.gif")
    assert sorted(Study(tmp_path / "serve").items) == ["a.webp"]
    save_video(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / "m" / "astro__b.webp", 8)
    study = Study(tmp_path)
    assert sorted(study.items) == ["m/astro__b.webp", "serve/a.webp"] and study.methods == ["m", "serve"]
    assert study.items["m/astro__b.webp"].reference == tmp_path / "references" / "astro.gif"  # still the reference


def test_videos_with_bad_sidecars_are_skipped_with_a_note(bench_run):
    videos = bench_run / "videos" / "baseline"
    bad = {"astro__beach.mp4.json": "{not json", "astro__rain.mp4.json": "[1, 2]",
           "astro__park.mp4.json": json.dumps({"prompt": "p", "identity": "astro.jpg"})}
    for name, text in bad.items():
        (videos / name).write_text(text)
    out = subprocess.run([sys.executable, "-m", "lynx", "study", str(bench_run), "--results"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "lynx study: skipped baseline/astro__beach.mp4: its sidecar astro__beach.mp4.json is not valid JSON" \
        in out.stderr
    assert "skipped baseline/astro__rain.mp4: its sidecar astro__rain.mp4.json is not a JSON object" in out.stderr
    assert "skipped baseline/astro__park.mp4: its sidecar astro__park.mp4.json has identity.images that are not" \
        in out.stderr
    study = Study(bench_run)
    assert sorted(study.items) == [f"lynx-full/astro__{p}.mp4" for p in ("beach", "park", "rain")]
    assert {i.prompt for i in study.items.values()} == set(PROMPTS.values())

    # Nothing usable left: one line, naming a bad sidecar.
    for video in (bench_run / "videos" / "lynx-full").glob("*.mp4"):
        sidecar_path(video).write_text(json.dumps({"prompt": 7}))
    out = subprocess.run([sys.executable, "-m", "lynx", "study", str(bench_run), "--results"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert last.startswith(f"lynx study: error: no usable videos under {bench_run}: 6 skipped for their sidecars, "
                           "e.g. baseline/astro__beach.mp4: its sidecar astro__beach.mp4.json is not valid JSON")
    assert last.endswith("; fix or delete those sidecars")


def test_the_db_folder_is_made_and_a_file_that_is_not_a_ratings_database_refused(bench_run, tmp_path):
    db = tmp_path / "new" / "deeper" / "ratings.sqlite"
    Study(bench_run, db=db).rate("ann", "baseline/astro__beach.mp4", dict.fromkeys(("FR", "PF", "AQ", "MN", "VQ"), 4))
    assert [r["ratings"] for r in Study(bench_run, db=db).results()] == [1]  # made once, then reopened

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n" * 20)
    out = subprocess.run([sys.executable, "-m", "lynx", "study", str(bench_run), "--db", str(notes), "--results"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and out.stderr == f"lynx study: error: {notes} exists and is not a SQLite database; " \
        "give --db a new file or a study's ratings file\n", out.stderr
    assert notes.read_text() == "my notes, not a database\n" * 20  # untouched
    with pytest.raises(InputError, match="is a folder; --db names the ratings file"):
        Study(bench_run, db=tmp_path)
    other = tmp_path / "other.sqlite"  # another program's database with a table of the same name
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE ratings (movie TEXT, stars INTEGER)")
    with pytest.raises(InputError, match="has a ratings table that is not lynx study's"):
        Study(bench_run, db=other)


def test_the_rating_page_in_a_browser(served, browser, screenshots):
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium): the page was not opened")
    study, url = served()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.fill("#rater textarea", "dana")
    page.get_by_role("button", name="Start").click()
    page.wait_for_selector("text=dana: 0 of 6 rated", timeout=60_000)
    video = page.wait_for_selector("video", timeout=60_000)
    page.wait_for_function("v => v.readyState >= 2", arg=video, timeout=30_000)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [48, 32]
    assert "baseline" not in page.inner_text("body") and "lynx-full" not in page.inner_text("body")
    page.screenshot(path=screenshots / "study-rate.png", full_page=True)
    for question, score in zip(("FR", "PF", "AQ", "MN", "VQ"), (4, 3, 5, 2, 4)):
        page.locator(f"#rate-{question}").get_by_label(str(score), exact=True).check()
    page.get_by_role("button", name="Submit and next").click()
    page.wait_for_selector("text=dana: 1 of 6 rated", timeout=60_000)
    with sqlite3.connect(study.db) as c:
        assert c.execute("SELECT fr, pf, aq, mn, vq FROM ratings WHERE rater = 'dana'").fetchall() == [(4, 3, 5, 2, 4)]
    page.close()
