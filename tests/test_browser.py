"""file_transfer's web page in a real headless Chromium (Debian's, driven by Selenium): log in with the
printed link, upload files, list a second node's files, download one while its progress bar moves,
cancel another, and see the error for an offline node; folders listed, opened and downloaded whole.
Screenshots go to the test's tmp dir (UPDATE_SCREENSHOT=1 also refreshes the README's picture)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100"]

if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("CI"):
        raise RuntimeError("chromium and chromium-driver are missing: .ci/run installs them")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from conftest import sha256  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "file_transfer-page.png"


# records whether the upload progress bar was shown and the highest value it reached
WATCH_UPLOAD_BAR = """
window.uploadBar = {shown: false, max: 0};
new MutationObserver(() => {
  if (!document.getElementById("upload").hidden) window.uploadBar.shown = true;
  window.uploadBar.max = Math.max(window.uploadBar.max, document.getElementById("upload-progress").value);
}).observe(document.getElementById("upload"), {attributes: true, subtree: true});
"""
CLICK = "const b = document.querySelector(arguments[0]); if (b) b.click(); return !!b;"
DROP_FILES = """
const dt = new DataTransfer();
for (const [name, text] of arguments[0]) dt.items.add(new File([text], name));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def make_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])


def _value(bar) -> int:
    try:
        return int(bar.get_attribute("value") or 0)
    except Exception:  # redrawn meanwhile
        return 0


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_file_transfer_page_in_chromium(two_nodes, browser, tmp_path):
    fake, fake2 = two_nodes
    shots = tmp_path / "screenshots"
    shots.mkdir()
    fake2.files.mkdir(parents=True, exist_ok=True)
    make_file(fake2.files / "big.bin", 1024)
    make_file(fake2.files / "other.bin", 1024)
    (fake2.files / "readme.txt").write_text("hello from fake2\n")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    # log in with the link the node printed; the homepage lists the app
    link = next(ln for ln in fake.lines if "web page:" in ln).split("web page: ")[1]
    browser.get(f"http://localhost:{fake.port}/file_transfer:file_transfer:template.os/")
    assert "/login" in browser.current_url  # not logged in yet: sent to the login page
    browser.get(link)
    app = wait.until(EC.element_to_be_clickable((By.PARTIAL_LINK_TEXT, "file_transfer")))
    shot("01-home")
    app.click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "live"), "live"))

    # upload two files with the file picker, and a hostile name refused with a message
    a, b, bad = tmp_path / "alpha.txt", tmp_path / "beta.bin", tmp_path / ".env"
    a.write_text("alpha\n")
    b.write_bytes(os.urandom(3_000_000))
    bad.write_text("SECRET=1\n")
    browser.execute_script(WATCH_UPLOAD_BAR)
    browser.find_element(By.ID, "upload-input").send_keys(f"{a}\n{b}")
    wait.until(EC.text_to_be_present_in_element((By.ID, "upload-msg"), "Uploaded alpha.txt, beta.bin"))
    assert browser.execute_script("return window.uploadBar") == {"shown": True, "max": 100}
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#my-files tr[data-name]")) >= 2)
    assert (fake.files / "alpha.txt").read_text() == "alpha\n"
    assert sha256(fake.files / "beta.bin") == sha256(b)
    browser.find_element(By.ID, "upload-input").send_keys(str(bad))
    wait.until(EC.text_to_be_present_in_element((By.ID, "upload-msg"), "may not start with '.'"))
    assert not (fake.files / ".env").exists()
    # drag-and-drop: a drop event carrying two files
    browser.execute_script(DROP_FILES, [["dropped-1.txt", "one"], ["dropped-2.txt", "two"]])
    wait.until(EC.text_to_be_present_in_element((By.ID, "upload-msg"), "Uploaded dropped-1.txt, dropped-2.txt"))
    assert (fake.files / "dropped-2.txt").read_text() == "two"
    shot("02-uploaded")

    # an offline node: the page says so
    browser.find_element(By.ID, "peer-node").send_keys("offline.dev")
    browser.find_element(By.ID, "peer-list").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "peer-error"), "offline.dev"))
    shot("03-offline")

    # the second node's files
    box = browser.find_element(By.ID, "peer-node")
    box.clear()
    box.send_keys("fake2.dev")
    browser.find_element(By.ID, "peer-list").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peer-files tr[data-name]")) == 3)
    assert browser.find_element(By.ID, "peer-error").text == ""

    # one-click download; the progress bar is seen moving; the file arrives whole
    browser.find_element(By.CSS_SELECTOR, '#peer-files button[data-name="big.bin"]').click()
    seen, details = set(), set()
    deadline = time.monotonic() + 120
    while not browser.find_elements(By.CSS_SELECTOR, '#history li.done[data-name="big.bin"]'):
        assert time.monotonic() < deadline, "big.bin did not finish"
        for bar in browser.find_elements(By.CSS_SELECTOR, '#transfers li[data-name="big.bin"] progress'):
            try:
                seen.add(int(bar.get_attribute("value")))
                details.add(browser.find_element(By.CSS_SELECTOR, '#transfers li[data-name="big.bin"] .detail').text)
            except Exception:  # the row was redrawn between the two calls
                pass
        if len(seen) == 2:
            shot("04-downloading")
        time.sleep(0.03)
    moving = sorted(v for v in seen if 0 < v < 100)
    assert len(moving) >= 2, f"progress values seen: {sorted(seen)}"
    assert any("MiB/s" in d and "ETA" in d for d in details), details
    assert sha256(fake.files / "big.bin") == sha256(fake2.files / "big.bin")

    # another download, cancelled while it runs (the provider frozen so it cannot finish first)
    browser.find_element(By.CSS_SELECTOR, '#peer-files button[data-name="other.bin"]').click()
    bar = '#transfers li.active[data-name="other.bin"] progress'
    wait.until(lambda d: any(_value(b) > 0 for b in d.find_elements(By.CSS_SELECTOR, bar)))
    os.kill(fake2.proc.pid, signal.SIGSTOP)
    try:
        # the list is redrawn on every push, so find and click the button in one step
        wait.until(lambda d: d.execute_script(CLICK, '#transfers li[data-name="other.bin"] button.cancel'))
        failed = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#history li.failed[data-name="other.bin"]')))
        assert "cancelled" in failed.text
    finally:
        os.kill(fake2.proc.pid, signal.SIGCONT)
    assert not (fake.files / "other.bin").exists()
    shot("05-finished")
    # on a phone's width nothing is cut off sideways
    browser.set_window_size(390, 844)
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shot("06-phone")
    print(f"screenshots in {shots}")


def tree_of(root: Path) -> dict:
    """{relative path: sha256, or None for a folder} of everything beneath root."""
    found: dict = {}
    for top, dirs, files in os.walk(root):
        for d in dirs:
            found[str(Path(top, d).relative_to(root))] = None
        for f in files:
            found[str(Path(top, f).relative_to(root))] = sha256(Path(top, f))
    return found


def rows(browser, table: str) -> list[str]:
    return browser.execute_script(
        f"return Array.from(document.querySelectorAll('#{table} tr[data-name]')).map(r => r.dataset.name)")


# the page's rendering of transfer rows it may not meet in a quick run: a queued download here, one
# waiting in the provider's queue, a folder half done, a finished folder
RENDER_STATE = """
showState({node: "fake.dev", allow: null, Transfers: [
  {node: "fake2.dev", name: "photos", bytes: 3145728, total: 10485760, rate: 1048576, files: 3, of: 12},
  {node: "fake2.dev", name: "talk.mkv", bytes: 0, total: null, rate: 0, queued_at: 2},
  {node: "fake2.dev", name: "disk-1.iso", queued: true}, {node: "fake2.dev", name: "disk-2.iso", queued: true}],
  history: [{node: "fake2.dev", name: "album", ok: true, error: "", bytes: 1073741838, secs: 4.2, files: 3}]});
return [Array.from(document.querySelectorAll("#transfers li")).map(li => li.textContent),
        document.querySelector("#history li").textContent];
"""


def test_folders_on_the_page_in_chromium(two_nodes, browser, tmp_path):
    """A folder uploaded from the browser; a nested folder on the provider: listed as a folder, opened
    (and back up by the path above the table), downloaded with one click, its progress in files, and
    the tree arrives byte-identical."""
    fake, fake2 = two_nodes
    album = fake2.files / "album"
    (album / "2024" / "empty").mkdir(parents=True)
    (album / "cover.txt").write_text("cover\n")
    (album / "2024" / "notes.md").write_text("# notes\n")
    make_file(album / "2024" / "big.bin", 1024)  # big enough for the page to see it under way
    (fake2.files / "readme.txt").write_text("hello\n")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    link = next(ln for ln in fake.lines if "web page:" in ln).split("web page: ")[1]
    browser.get(link)
    browser.get(f"http://localhost:{fake.port}/file_transfer:file_transfer:template.os/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "live"), "live"))

    # a folder uploaded with the folder picker arrives as a folder
    holiday = tmp_path / "holiday"
    (holiday / "day1").mkdir(parents=True)
    (holiday / "day1" / "beach.txt").write_text("sand\n")
    (holiday / "plan.txt").write_text("go\n")
    browser.find_element(By.ID, "upload-folder").send_keys(str(holiday))
    wait.until(EC.text_to_be_present_in_element((By.ID, "upload-msg"), "Uploaded holiday/"))
    wait.until(lambda d: "holiday/" in rows(d, "my-files"))
    assert "2 files" in browser.find_element(By.CSS_SELECTOR, '#my-files tr[data-name="holiday/"]').text
    assert tree_of(fake.files / "holiday") == tree_of(holiday)

    browser.find_element(By.ID, "peer-node").send_keys("fake2.dev")
    browser.find_element(By.ID, "peer-list").click()
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["album/", "readme.txt"])
    folder_row = browser.find_element(By.CSS_SELECTOR, '#peer-files tr[data-name="album/"]').text
    assert "3 files" in folder_row and "1.0 GiB" in folder_row, folder_row
    # open the folder, then the one inside it; the path above the table leads back up
    browser.find_element(By.CSS_SELECTOR, '#peer-files a.open[data-name="album/"]').click()
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["2024/", "cover.txt"])
    browser.find_element(By.CSS_SELECTOR, '#peer-files a.open[data-name="2024/"]').click()
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["big.bin", "empty/", "notes.md"])
    assert browser.find_element(By.ID, "peer-path").text == "fake2.dev / album / 2024"
    assert "0 files" in browser.find_element(By.CSS_SELECTOR, '#peer-files tr[data-name="empty/"]').text
    # inside a folder, one click fetches the whole top folder (a download takes a top-level name)
    assert browser.find_element(By.ID, "peer-whole").text == "Download album/ (the whole folder)"
    browser.save_screenshot(str(tmp_path / "01-inside.png"))
    browser.find_element(By.CSS_SELECTOR, '#peer-path a[data-folder="album"]').click()
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["2024/", "cover.txt"])
    browser.find_element(By.CSS_SELECTOR, '#peer-path a[data-folder=""]').click()
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["album/", "readme.txt"])

    # one click downloads the whole folder; its row counts files
    browser.find_element(By.CSS_SELECTOR, '#peer-files button[data-name="album/"]').click()
    details = set()
    deadline = time.monotonic() + 120
    while not browser.find_elements(By.CSS_SELECTOR, '#history li.done[data-name="album"]'):
        assert time.monotonic() < deadline, "album did not finish"
        for d in browser.find_elements(By.CSS_SELECTOR, '#transfers li[data-name="album"] .detail'):
            try:
                details.add(d.text)
            except Exception:  # redrawn meanwhile
                pass
        if len(details) == 2:
            browser.save_screenshot(str(tmp_path / "02-downloading.png"))
        time.sleep(0.03)
    assert any(" of 3 files" in d and "MiB/s" in d for d in details), details
    assert "folder of 3 files" in browser.find_element(By.CSS_SELECTOR, '#history li[data-name="album"]').text
    assert tree_of(fake.files / "album") == tree_of(album)
    assert tree_of(album)["2024/empty"] is None  # the empty folder came too

    # this node's files now show the folder; open it, and a file inside is saved byte-identical
    wait.until(lambda d: "album/" in rows(d, "my-files"))
    browser.find_element(By.CSS_SELECTOR, '#my-files a.open[data-name="album/"]').click()
    wait.until(lambda d: sorted(rows(d, "my-files")) == ["2024/", "cover.txt"])
    browser.find_element(By.CSS_SELECTOR, '#my-files a.open[data-name="2024/"]').click()
    wait.until(lambda d: sorted(rows(d, "my-files")) == ["big.bin", "empty/", "notes.md"])
    saved = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const a = document.querySelector('#my-files tr[data-name="notes.md"] a');
        fetch(a.href).then(r => r.text()).then(done, e => done("error " + e));""")
    assert saved == "# notes\n"
    browser.save_screenshot(str(tmp_path / "03-mine.png"))

    # a folder that is not there: a clear error, and the listing still works
    browser.execute_script("listPeer('fake2.dev', 'nope')")
    wait.until(EC.text_to_be_present_in_element((By.ID, "peer-error"), "fake2.dev has no folder nope"))
    browser.execute_script("listPeer('fake2.dev', 'album')")
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["2024/", "cover.txt"])
    assert browser.find_element(By.ID, "peer-error").text == ""

    # rows for a queue and a folder in progress, rendered from a given state
    transfers, history = browser.execute_script(RENDER_STATE)
    assert "30% · 3 of 12 files · 3.0 MiB of 10.0 MiB · 1.0 MiB/s" in transfers[0] and "photos/" in transfers[0]
    assert "queued at fake2.dev, position 2" in transfers[1]
    assert "queued here, position 1" in transfers[2] and "queued here, position 2" in transfers[3]
    assert "folder of 3 files" in history
    if os.environ.get("UPDATE_SCREENSHOT"):  # the README's picture: folders on both sides
        browser.execute_script("listPeer('fake2.dev', '')")
        wait.until(lambda d: sorted(rows(d, "peer-files")) == ["album/", "readme.txt"])
        browser.execute_script(RENDER_STATE)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
    # inside folders on a phone's width nothing is cut off sideways
    browser.execute_script("listPeer('fake2.dev', 'album/2024')")
    wait.until(lambda d: sorted(rows(d, "peer-files")) == ["big.bin", "empty/", "notes.md"])
    browser.set_window_size(390, 844)
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(tmp_path / "04-phone.png"))


# a page on another localhost port, as a site the user visits while logged in to the node: a form
# POST whose text/plain body is valid JSON (the allow rule), a no-cors multipart upload, a no-cors
# download request; each goes with the node's cookie (every port of localhost is the same site)
ATTACK_PAGE = """<!doctype html><html><body>
<iframe name=sink></iframe>
<form id=f method=POST enctype=text/plain target=sink action="BASEallow">
<input name='{"allow":["mallory.dev"],"x":"' value='"}'></form>
<script>
async function attack() {
  document.getElementById("f").submit();
  const fd = new FormData();
  fd.append("files", new File(["planted"], "planted.txt"));
  const opts = {method: "POST", mode: "no-cors", credentials: "include"};
  await fetch("BASEfiles", {...opts, body: fd}).catch(() => {});
  await fetch("BASEdownload", {...opts, body: JSON.stringify({name: "readme.txt", node: "fake2.dev"})}).catch(() => {});
  document.title = "sent";
}
attack();
</script></body></html>"""

# the node's own page does the same three things the way its app does
OWN_PAGE_ACTS = """
const done = arguments[arguments.length - 1];
const base = location.pathname.replace(/[^/]*$/, "");
const json = {"Content-Type": "application/json"};
const fd = new FormData();
fd.append("files", new File(["mine"], "mine.txt"));
Promise.all([
  fetch(base + "allow", {method: "PUT", headers: json, body: JSON.stringify({allow: ["mallory.dev"]})}),
  fetch(base + "files", {method: "POST", body: fd}),
  fetch(base + "download", {method: "POST", headers: json, body: JSON.stringify({name: "readme.txt", node: "fake2.dev"})}),
]).then(rs => done(rs.map(r => r.status)), e => done("error " + e));
"""


def test_a_file_from_two_nodes_on_the_page_in_chromium(node_factory, browser, tmp_path):
    """The node field takes a list (p1.dev,p2.dev): its files listed, one click fetches pieces from each."""
    from test_multi import served_by
    fake, p1, p2 = node_factory("fake.dev"), node_factory("p1.dev"), node_factory("p2.dev")
    make_file(p1.files / "w.bin", 12)
    (p2.files / "w.bin").write_bytes((p1.files / "w.bin").read_bytes())
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(next(ln for ln in fake.lines if "web page:" in ln).split("web page: ")[1])
    browser.get(f"http://localhost:{fake.port}/file_transfer:file_transfer:template.os/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "live"), "live"))
    browser.find_element(By.ID, "peer-node").send_keys("p1.dev,p2.dev")
    browser.find_element(By.ID, "peer-list").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#peer-files button[data-name="w.bin"]'))
    browser.find_element(By.CSS_SELECTOR, '#peer-files button[data-name="w.bin"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#history li.done[data-name="w.bin"]'))
    browser.save_screenshot(str(tmp_path / "from-two-nodes.png"))
    assert sha256(fake.files / "w.bin") == sha256(p1.files / "w.bin")
    served = served_by(fake, "w.bin")
    assert set(served) == {"p1.dev", "p2.dev"} and all(served.values()), served


def test_a_page_on_another_local_port_cannot_act_on_the_node(two_nodes, browser):
    import http.server
    import json
    import threading
    import urllib.request

    fake, fake2 = two_nodes
    fake2.files.mkdir(parents=True, exist_ok=True)
    (fake2.files / "readme.txt").write_text("hello from fake2\n")
    base = f"http://localhost:{fake.port}/file_transfer:file_transfer:template.os/"
    page = ATTACK_PAGE.replace("BASE", base).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    token = (fake.home / ".keys" / "http-token").read_text().strip()

    def api(path: str):
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        link = next(ln for ln in fake.lines if "web page:" in ln).split("web page: ")[1]
        browser.get(link)  # the user is logged in
        before = len(fake.lines)
        browser.get(f"http://localhost:{evil.server_port}/")
        wait.until(lambda d: d.title == "sent")
        # the three requests reached the node, with the cookie, and were refused
        wait_for = time.monotonic() + 60
        while sum("http: refused POST" in ln and "cross-origin" in ln for ln in fake.lines[before:]) < 3:
            assert time.monotonic() < wait_for, fake.lines[before:]
            time.sleep(0.05)
        refused = [ln for ln in fake.lines[before:] if "http: refused" in ln]
        assert all(f"Origin http://localhost:{evil.server_port}" in ln for ln in refused), refused
        assert {ln.split(" ")[3].split("/")[-1].rstrip(":") for ln in refused} == {"allow", "files", "download"}
        assert api("allow") == {"allow": None}
        assert not (fake.files / "planted.txt").exists() and not (fake.files / "readme.txt").exists()
        assert api("transfers")["Transfers"] == [] and api("transfers")["history"] == []

        # control: the node's own page does each of them
        browser.get(base)
        wait.until(EC.text_to_be_present_in_element((By.ID, "live"), "live"))
        assert browser.execute_async_script(OWN_PAGE_ACTS) == [200, 200, 200]
        assert api("allow") == {"allow": ["mallory.dev"]}
        assert (fake.files / "mine.txt").read_text() == "mine"
        wait.until(lambda d: (fake.files / "readme.txt").exists()
                   and (fake.files / "readme.txt").read_text() == "hello from fake2\n")
    finally:
        evil.shutdown()
