"""The HTML report: ``sfact report``, the end of ``sfact run all`` and ``sfact.pl.report``.

The page is checked as text (one row per prior, every image a data URI, nothing fetched) and
rendered in headless Chromium, driven over the DevTools protocol on a pipe: no console errors,
every image decoded, one table row per prior. The browser tests skip, saying why, when no
Chromium binary is found (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sfact._cli import main


def _tiny_config() -> str:
    """The tiny config of ``test_cli.py`` (tests are no package: loaded from its file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sfact_test_cli", Path(__file__).with_name("test_cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY


TINY = _tiny_config()

#: the priors of the tiny run (fewer than all: the test stays fast)
RUN_PRIORS = ("pnmf", "svgp", "mggp_lcgp")


# -- the page as text ---------------------------------------------------------------------------
class _Page(HTMLParser):
    """Rows of the priors table, the ``src`` of every image and every URL-valued attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._in_priors = False
        self._cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table" and a.get("id") == "priors":
            self._in_priors = True
        if self._in_priors and tag == "tr" and "prior-row" in (a.get("class") or ""):
            self.rows.append("")
            self._cell = True
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(a[k])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_priors = False
        if tag == "tr":
            self._cell = False

    def handle_data(self, data):
        if self._cell and self.rows and not self.rows[-1]:
            self.rows[-1] = data.strip()


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def check_self_contained(path: Path) -> _Page:
    text = path.read_text()
    page = parse(path)
    assert page.imgs and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text)  # no fetches, no CDN
    assert "@import" not in text and "<link" not in text
    assert not [u for u in page.urls if not u.startswith(("data:", "#")) and Path(u).is_absolute()]
    # links to the outputs are relative to the report and point at existing files
    for u in page.urls:
        if not u.startswith(("data:", "#")):
            assert (path.parent / u).exists(), u
    return page


# -- a headless browser over the DevTools protocol -------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


needs_browser = pytest.mark.skipif(
    _chromium() is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) on PATH"
)


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands, fd 4: replies)."""

    def __init__(self, binary: str, tmp: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def fds():
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={tmp / 'profile'}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=30.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout=30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


def render(path: Path, tmp: Path, *, screenshot: Path | None = None, width: int = 1200) -> dict:
    """Open ``path`` in headless Chromium; what the page reports after its load event.

    Returns ``{"rows", "images", "images_ok", "natural_widths", "flag", "errors"}``: the priors
    table's rows, the images and how many decoded (``naturalWidth > 0``), the page's own
    ``data-images-ok`` flag, and the console errors and uncaught exceptions.
    """
    b = Browser(_chromium(), tmp)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            b.send(f"{domain}.enable", session=s)
        b.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        b.send("Page.navigate", {"url": path.resolve().as_uri()}, session=s)
        b.wait_event("Page.loadEventFired")
        js = """JSON.stringify({
            rows: document.querySelectorAll('#priors tbody tr').length,
            images: document.images.length,
            images_ok: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
            natural_widths: Array.from(document.images).map(i => i.naturalWidth),
            flag: document.body.getAttribute('data-images-ok'),
            page_errors: document.body.getAttribute('data-errors'),
            height: document.documentElement.scrollHeight})"""
        value = json.loads(
            b.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, session=s)["result"][
                "value"
            ]
        )
        if screenshot is not None:
            b.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": value["height"], "deviceScaleFactor": 1, "mobile": False},
                session=s,
            )
            data = b.send(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=s
            )
            import base64

            screenshot.write_bytes(base64.b64decode(data["data"]))
        b.send("Runtime.evaluate", {"expression": "1"}, session=s)  # flush pending events
        errors = []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text", ""))
        value["errors"] = errors
        return value
    finally:
        b.close()


# -- a tiny run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``sfact run all`` on the tiny config of ``test_cli`` for three priors; its stdout."""
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.yaml").write_text(TINY)
    proc_out = root / "stdout.txt"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "run",
                "all",
                "-c",
                str(root / "tiny.yaml"),
                "--executor",
                "serial",
                "--plain",
                "--prior",
                ",".join(RUN_PRIORS),
            ]
        )
    proc_out.write_text(buf.getvalue())
    assert rc == 0, buf.getvalue()
    return root


def test_run_all_ends_with_the_report(tiny_run):
    out = (tiny_run / "stdout.txt").read_text()
    report = tiny_run / "out" / "report.html"
    assert report.is_file()
    assert out.rstrip().splitlines()[-1].startswith(f"Report: {report} (")
    size = report.stat().st_size
    assert 10_000 < size < 1_000_000  # downscaled images: small


def test_report_is_self_contained_with_one_row_per_prior(tiny_run, capsys):
    report = tiny_run / "out" / "report.html"
    report.unlink()
    rc = main(["report", "-c", str(tiny_run / "tiny.yaml")])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith(f"Report: {report} (") and report.is_file()
    page = check_self_contained(report)
    assert page.rows == list(RUN_PRIORS)
    assert "script" in page.tags  # the image check of the page itself
    text = report.read_text()
    # every prior's section, its figures, the ELBO, the top genes, the config and the versions
    for prior in RUN_PRIORS:
        assert f'id="prior-{prior}"' in text and f'href="{prior}/metrics.json"' in text
    assert 'alt="ELBO curves of the priors"' in text
    assert "Factors per group" in text  # mggp_lcgp's groupwise figure
    assert "Top genes" in text and "Sox10" in text
    assert "name: tiny" in text and '<td class="name">torch</td>' in text
    # the metrics in the table are those of metrics.json
    n_iter = json.loads((tiny_run / "out" / "svgp" / "metrics.json").read_text())["n_iter"]
    svgp_row = re.search(
        r'<tr class="prior-row[^"]*">\s*<td class="name"><a href="#prior-svgp">.*?</tr>', text, re.S
    )
    assert svgp_row is not None and f"<td>{n_iter}</td>" in svgp_row.group(0)


def test_report_without_outputs_fails_naming_the_fix(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc = main(["report", "-c", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no analysed prior" in err and f"run `sfact run all -c {cfg}` first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # nothing written


@needs_browser
def test_report_renders_in_a_headless_browser(tiny_run, tmp_path):
    report = tiny_run / "out" / "report.html"
    shot = tmp_path / "shot.png"
    seen = render(report, tmp_path, screenshot=shot)
    assert seen["errors"] == []
    assert seen["page_errors"] == "0"
    assert seen["rows"] == len(RUN_PRIORS)
    assert seen["images"] == len(parse(report).imgs) > 0
    assert seen["images_ok"] == seen["images"] and min(seen["natural_widths"]) > 0
    assert seen["flag"] == "true"
    assert shot.stat().st_size > 10_000


@needs_browser
def test_browser_check_sees_a_broken_image(tiny_run, tmp_path):
    """The browser check can fail: a page with an undecodable image is reported as such."""
    text = (tiny_run / "out" / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    seen = render(broken, tmp_path)
    assert seen["images_ok"] == seen["images"] - 1
    assert seen["flag"] == "false"


def test_pl_report_one_fit(tmp_path):
    import sfact

    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, random_state=0)
    sfact.pp.prepare(adata)
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=3, random_state=0)
    path = sfact.pl.report(adata, tmp_path / "sub" / "fit.html", title="simulated fit")
    assert path == tmp_path / "sub" / "fit.html"
    page = check_self_contained(path)
    assert page.rows == ["pnmf"]
    text = path.read_text()
    assert "<title>simulated fit · sfact report</title>" in text and "200 cells × 20 genes" in text
    assert 'alt="ELBO curves of the priors"' in text and "Top genes" in text
    with pytest.raises(KeyError, match=r"fit a model first with `sfact.tl.fit\(adata, key_added='other'\)`"):
        sfact.pl.report(adata, tmp_path / "x.html", key="other")
    assert not (tmp_path / "x.html").exists()
