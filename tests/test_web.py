"""`lynx serve` on the tiny model: the JSON API, refusals, missing weights, and the page in headless chromium.

The server runs in-process on 127.0.0.1 (a free port) for the API and browser tests, and as a `lynx serve`
subprocess for the missing-weights test. The browser is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe), so nothing beyond chromium itself is needed.
"""

import base64
import fcntl
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from lynx.apps.web import LynxWebApp, ServeConfig, make_server
from lynx.io.video import read_video

REPO = Path(__file__).resolve().parent.parent
TINY = {"height": 32, "width": 48, "frames": 5, "steps": 3}


# ----- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_base, adapter_dirs, face_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("web_out")
    app = LynxWebApp(ServeConfig(base=tiny_base, adapter=adapter_dirs["full"], out_dir=out,
                                 face_models=face_models, detector="dlib"))
    app.start()
    assert app.wait_until_loaded(120) and app.model_state == "ready", app.model_error
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


# ----- HTTP helpers ---------------------------------------------------------------------------------------
def call(url, method="GET", body=None, headers=None):
    """(status, decoded JSON or raw bytes) without raising on 4xx/5xx."""
    data_ = body
    headers = dict(headers or {})
    if isinstance(body, dict):
        data_ = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data_, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(raw) if ctype.startswith("application/json") else raw)


def upload(base_url, *paths):
    boundary = uuid.uuid4().hex
    parts = []
    for p in paths:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="{Path(p).name}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + Path(p).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return call(base_url + "api/face", "POST", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def wait_job(base_url, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        status, job = call(f"{base_url}api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still running after {timeout} s: {job}")


def decode_png(data_url):
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


# ----- JSON API -------------------------------------------------------------------------------------------
def test_page_and_status(server):
    status, page = call(server.url)
    assert status == 200 and b'id="generate"' in page and b'id="photos"' in page
    status, s = call(server.url + "api/status")
    assert status == 200 and s["model"]["state"] == "ready" and s["model"]["variant"] == "full"
    assert s["missing"] is None and s["face"]["embedding"] is True
    assert s["defaults"]["frames"] == 81 and s["defaults"]["guidance_i"] == 2.0 and s["defaults"]["fps"] == 16


def test_face_check_shows_the_crop_and_refuses_a_cat(server, photos):
    status, body = upload(server.url, photos / "astronaut.jpg")
    assert status == 200, body
    (p,) = body["photos"]
    assert p["faces"] == 1 and p["error"] is None and p["name"] == "astronaut.jpg" and body["embedding"]
    assert decode_png(p["reference"]).size == (256, 256)
    x1, y1, x2, y2 = p["box"]
    assert 100 < x1 < x2 < 350 and 20 < y1 < y2 < 250  # the astronaut's face, upper middle of the photo
    stored = list((Path(server.app.out_dir) / "photos").glob(f"*-{p['id']}.jpg"))
    assert len(stored) == 1 and stored[0].read_bytes() == (photos / "astronaut.jpg").read_bytes()

    status, body = upload(server.url, photos / "cat.jpg")
    assert status == 422
    assert body["photos"][0]["error"].startswith("no face found in cat.jpg; use a photo where one face")
    assert body["error"] == body["photos"][0]["error"] and "Traceback" not in json.dumps(body)

    status, body = call(server.url + "api/face", "POST", b"not a form", {"Content-Type": "text/plain"})
    assert status == 400 and "multipart/form-data" in body["error"]


def test_generate_writes_video_and_sidecar_never_overwriting(server, photos):
    _, faces = upload(server.url, photos / "astronaut.jpg")
    photo_id = faces["photos"][0]["id"]
    out = Path(server.app.out_dir)
    squatter = out / "astronaut-a-woman-smiling-s7.mp4"  # e.g. made by the CLI earlier, no sidecar
    squatter.write_bytes(b"keep me")
    names = []
    for fmt in (".mp4", ".mp4", ".gif"):
        status, body = call(server.url + "api/generate", "POST",
                            {"photos": [photo_id], "prompt": "a woman smiling", "seed": 7, "format": fmt, **TINY})
        assert status == 202, body
        job = wait_job(server.url, body["job"]["id"])
        assert job["state"] == "done", job["error"]
        assert job["step"] == job["total"] == 3
        names.append(job["video"]["name"])
    assert names == ["astronaut-a-woman-smiling-s7-2.mp4", "astronaut-a-woman-smiling-s7-3.mp4",
                     "astronaut-a-woman-smiling-s7.gif"]
    assert squatter.read_bytes() == b"keep me"

    frames, fps = read_video(out / names[0])
    assert frames.shape == (5, 32, 48, 3) and fps == 16
    assert read_video(out / names[2])[0].shape == (5, 32, 48, 3)
    side = json.loads((out / (names[0] + ".json")).read_text())
    assert (side["prompt"], side["seed"], side["num_frames"], side["height"], side["width"]) == \
        ("a woman smiling", 7, 5, 32, 48)
    assert side["guidance_scale"] == 5.0 and side["guidance_scale_i"] == 2.0 and side["variant"] == "full"
    digest = hashlib.sha256((photos / "astronaut.jpg").read_bytes()).hexdigest()
    assert side["identity"]["images"][0]["sha256"] == digest
    assert side["command"].startswith("lynx generate --image ") and "--seed 7" in side["command"]
    # Same seed, same settings: the same video as the first run (decoded frames identical).
    assert (read_video(out / names[1])[0] == frames).all()

    status, raw = call(server.url + "files/" + names[0])
    assert status == 200 and raw == (out / names[0]).read_bytes()
    req = urllib.request.Request(server.url + "files/" + names[0], headers={"Range": "bytes=4-11"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == raw[4:12] and r.headers["Content-Range"].endswith(f"/{len(raw)}")
    _, listing = call(server.url + "api/videos")
    listed = [v["name"] for v in listing["videos"]]
    assert set(names) <= set(listed) and squatter.name not in listed  # no sidecar, not a video of ours


def test_one_generation_at_a_time(server, photos):
    _, faces = upload(server.url, photos / "astronaut.jpg")
    request = {"photos": [faces["photos"][0]["id"]], "prompt": "a man running in the park", **TINY}
    gate, reached = threading.Event(), threading.Event()

    def hold(job):
        reached.set()
        assert gate.wait(60)

    server.app.on_step = hold
    try:
        status, first = call(server.url + "api/generate", "POST", request)
        assert status == 202, first
        assert reached.wait(60)  # the first video is between steps 1 and 2 now
        status, second = call(server.url + "api/generate", "POST", request)
        assert status == 409 and second["error"].startswith("busy: another video is being made (step 1 of 3")
        assert second["job"]["id"] == first["job"]["id"]
        _, s = call(server.url + "api/status")
        assert s["job"]["id"] == first["job"]["id"] and s["job"]["message"] == "step 1 of 3"
        # The name is claimed at once (empty) but neither listed nor served until the video is written.
        claimed = Path(server.app.out_dir) / "astronaut-a-man-running-in-the-park-s42.mp4"
        assert claimed.is_file() and claimed.stat().st_size == 0
        assert claimed.name not in json.dumps(call(server.url + "api/videos")[1])
        assert call(server.url + "files/" + claimed.name)[0] == 404
    finally:
        gate.set()
        server.app.on_step = lambda job: None
    assert wait_job(server.url, first["job"]["id"])["state"] == "done"
    status, third = call(server.url + "api/generate", "POST", request)  # free again
    assert status == 202 and wait_job(server.url, third["job"]["id"])["state"] == "done"


def test_several_photos_make_one_identity(server, photos, tmp_path):
    Image.fromarray(data.astronaut()[:, ::-1]).save(tmp_path / "mirrored.png")
    status, faces = upload(server.url, photos / "astronaut.jpg", tmp_path / "mirrored.png")
    assert status == 200 and [p["faces"] for p in faces["photos"]] == [1, 1]
    assert -1 <= faces["similarity"] <= 1
    ids = [p["id"] for p in faces["photos"]]
    status, body = call(server.url + "api/generate", "POST",
                        {"photos": ids, "prompt": "a close up portrait", "format": "webp", **TINY})
    job = wait_job(server.url, body["job"]["id"])
    assert job["state"] == "done", job["error"]
    images = job["video"]["sidecar"]["identity"]["images"]
    assert [Path(i["path"]).name for i in images] == [f"astronaut-{ids[0]}.jpg", f"mirrored-{ids[1]}.png"]
    assert " --image " in job["video"]["sidecar"]["command"] and images[1]["path"] in job["video"]["sidecar"]["command"]


@pytest.mark.parametrize("change,message", [
    ({"frames": 6, "height": 30}, "invalid video size: frames=6 is not 4k+1 (try 5 or 9); height=30 is not a "
                                  "positive multiple of 16 (try 16 or 32)"),
    ({"steps": 1000000}, "steps=1000000 is above the limit of 200"),
    ({"fps": 0}, "fps=0 must be between 1 and 240"),
    ({"guidance": "nan"}, "guidance=nan must be a finite number"),
    ({"seed": -1}, "seed=-1 must be in [0, 2**63)"),
    ({"prompt": "  "}, "the prompt is empty"),
    ({"photos": []}, "no photo: upload a photo of the person first"),
    ({"photos": ["0123456789abcdef"]}, "photo 0123456789abcdef is not on the server"),
    ({"photos": ["../../etc/passwd"]}, "'../../etc/passwd' is not a photo id from /api/face"),
    ({"steps": "many"}, "steps must be a number, got 'many'"),
    ({"format": ".avi"}, "format must be one of .mp4, .webp, .gif"),
    ({"guidence": 3}, "unknown setting(s) guidence"),
])
def test_bad_requests_get_the_cli_messages(server, photos, change, message):
    _, faces = upload(server.url, photos / "astronaut.jpg")
    request = {"photos": [faces["photos"][0]["id"]], "prompt": "a woman smiling", **TINY, **change}
    status, body = call(server.url + "api/generate", "POST", request)
    assert status == 400 and body["error"].startswith(message), body


def test_requests_that_are_refused(server):
    assert call(server.url + "files/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert call(server.url + "files/photos")[0] == 404
    status, body = call(server.url + "api/generate", "POST", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"].startswith("the request body is not JSON")
    # A page on another site must not start generations; nor may a rebinding DNS name reach the server.
    status, body = call(server.url + "api/generate", "POST", {"prompt": "x"}, {"Origin": "http://evil.example"})
    assert status == 403 and body["error"] == "cross-origin request refused"
    assert call(server.url + "api/status", headers={"Host": "evil.example"})[0] == 403
    assert call(server.url + "api/jobs/nope")[0] == 404


# ----- missing weights: `lynx serve` as a subprocess ------------------------------------------------------
def start_serve(*args, cwd, env):
    proc = subprocess.Popen([sys.executable, "-m", "lynx", "serve", "--port", "0", *map(str, args)], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, stderr=subprocess.PIPE, text=True)
    lines, end = [], time.time() + 120
    while time.time() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "lynx serve: open http://" in line:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, line.split("open ", 1)[1].split()[0], lines
    proc.kill()
    raise AssertionError("lynx serve did not start:\n" + "".join(lines))


def test_serve_without_weights_says_what_to_download_and_checks_faces(photos, tmp_path):
    proc, url, log = start_serve("--out-dir", tmp_path / "out", "--face-models", tmp_path / "face",
                                 "--detector", "dlib", cwd=tmp_path, env={"LYNX_MODELS": str(tmp_path / "models")})
    try:
        status, s = call(url + "api/status")
        assert status == 200 and s["model"]["state"] == "missing"
        missing = s["missing"]
        assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir" in missing
        assert "hf download ByteDance/lynx --include 'lynx_full/*'" in missing
        assert str(tmp_path / "models" / "Wan2.1-T2V-14B-Diffusers") in missing
        assert "recognition_arcface_ir_se50.pth" in missing and str(tmp_path / "face") in missing

        # The face check needs no download: detection and the reference crop still work.
        status, body = upload(url, photos / "astronaut.jpg")
        assert status == 200 and body["photos"][0]["faces"] == 1 and not body["embedding"]
        assert decode_png(body["photos"][0]["reference"]).size == (256, 256)
        assert "recognition_arcface_ir_se50.pth" in body["note"]

        status, gen = call(url + "api/generate", "POST",
                           {"photos": [body["photos"][0]["id"]], "prompt": "a woman smiling", **TINY})
        assert status == 503 and gen["error"] == missing

        browser = _chromium()
        if browser is not None:  # the page shows the same instructions
            with Browser(browser) as b:
                b.open(url)
                text = b.wait_for("document.getElementById('model-status').dataset.state === 'missing' && "
                                  "document.getElementById('missing').textContent")
                assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers" in text
                assert "recognition_arcface_ir_se50.pth" in text
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 0, "".join(log)
    assert "Traceback" not in "".join(log) and "cannot generate yet" in "".join(log)


# ----- the page in a real browser -------------------------------------------------------------------------
def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe).

    The protocol is JSON messages ended by NUL on file descriptors 3 (to the browser) and 4 (from it); bash
    puts the pipes there, since a preexec_fn is unsafe in this multi-threaded process.
    """

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync")

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="lynx-chromium-")
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # The browser's ends must not already be 3 or 4, or the redirections below would clobber them.
        to_browser, from_browser = (self._above_4(fd) for fd in (to_browser, from_browser))
        script = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, binary, *self.FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    @staticmethod
    def _above_4(fd):
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close", session=False, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method, session=None, timeout=30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session is not False and (session or self.session):
            msg["sessionId"] = session or self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while True:
            while b"\0" not in self._buf:
                left = end - time.time()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()}) during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url):
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('generate')")

    def wait_for(self, expression, timeout=90):
        end = time.time() + timeout
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never satisfied {expression!r}; error box: "
                             f"{self.js('document.getElementById(`error`).textContent')!r}; page text: "
                             f"{self.js('document.body.innerText')[:1500]!r}")

    def set_files(self, selector, paths):
        obj = self.send("Runtime.evaluate", expression=f"document.querySelector({json.dumps(selector)})")
        self.send("DOM.setFileInputFiles", files=[str(p) for p in paths], objectId=obj["result"]["objectId"])

    def type(self, element_id, value):
        self.js(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
                f"e.value = {json.dumps(str(value))}; e.dispatchEvent(new Event('input')); }})()")


@pytest.fixture()
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium); the page could not be "
                    "opened in a browser")
    with Browser(binary) as b:
        yield b


def test_page_face_check_generate_and_play(server, photos, browser):
    b = browser
    b.open(server.url)
    b.wait_for("document.getElementById('model-status').dataset.state === 'ready'")
    assert b.js("document.getElementById('steps').value") == "50"  # the variant's defaults are filled in

    # A photo without a face: the page says so, in the CLI's words.
    b.set_files("#photos", [photos / "cat.jpg"])
    bad = b.wait_for("document.querySelector('.face .bad')?.textContent")
    assert bad.startswith("no face found in cat.jpg")
    b.js("document.getElementById('generate').click()")
    assert b.wait_for("document.getElementById('error').textContent").startswith("None of the photos has a usable face")

    b.set_files("#photos", [photos / "astronaut.jpg"])
    found = b.wait_for("document.querySelector('.face[data-faces=\"1\"] .faces-found')?.textContent")
    assert found.startswith("faces found: 1")
    assert b.wait_for("(() => { const c = document.querySelector('.face img.crop'); "
                      "return c && c.complete && c.naturalWidth; })()") == 256

    b.type("prompt", "a woman walks on the beach")
    for key, value in {**TINY, "seed": 11}.items():
        b.type(key, value)
    # Hold the video after step 1 so the page's live progress can be seen, then let it finish.
    gate = threading.Event()
    server.app.on_step = lambda job: gate.wait(60) if job.step == 1 else None
    try:
        b.js("document.getElementById('generate').click()")
        b.wait_for("document.getElementById('progress-text').textContent === 'step 1 of 3'")
        assert b.js("document.getElementById('generate').disabled") is True
    finally:
        gate.set()
        server.app.on_step = lambda job: None
    b.wait_for("document.getElementById('result-video')?.dataset.loaded === '1'")
    video = b.js("(() => { const v = document.getElementById('result-video'); "
                 "return {tag: v.tagName, w: v.videoWidth, h: v.videoHeight, src: v.currentSrc}; })()")
    name = "astronaut-a-woman-walks-on-the-beach-s11.mp4"
    assert video == {"tag": "VIDEO", "w": 48, "h": 32, "src": server.url + "files/" + name}
    assert b.js("fetch(document.getElementById('download').href).then(r => r.status)") == 200
    settings = b.js("document.getElementById('result-settings').innerText")
    assert "a woman walks on the beach" in settings and "48x32, 5 frames at 16 fps" in settings
    assert b.js("document.getElementById('download').getAttribute('download')") == name
    assert (Path(server.app.out_dir) / name).is_file()
    b.wait_for(f"document.getElementById('history').innerText.includes({json.dumps(name)})")

    # WebP: shown as an image, and it decodes in the browser.
    b.js("document.getElementById('format').value = '.webp'")
    b.js("document.getElementById('generate').click()")
    b.wait_for("document.getElementById('result-video')?.tagName === 'IMG' && "
               "document.getElementById('result-video').dataset.loaded === '1'")
    assert b.js("document.getElementById('result-video').naturalWidth") == 48
    assert b.js("document.getElementById('result-title').textContent") == name.replace(".mp4", ".webp")
