"""The sample app, examples/rsvp: its own unit tests, its one-command start, and the
whole thing end to end — Django, the real dolores binary, the JavaScript client the
server serves — in Debian's headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness import API_KEY, DOLORES_BIN, REPO, DoloresServer, Forwarder, clean_env, free_port, spawn, wait_until

EXAMPLE = REPO / "examples" / "rsvp"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
WAIT_MS = 20_000


def get(url: str, headers: dict | None = None, timeout: float = 2) -> tuple:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def refuses(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


def test_the_apps_own_tests_pass():
    """examples/rsvp/contacts/tests.py, run by Django's runner as the app's developers
    would, with dolores.django.testing instead of a server."""
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "--noinput", "-v", "1"],
        cwd=EXAMPLE,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stderr


def test_run_sh_starts_dolores_and_the_site_and_ctrl_c_stops_both(tmp_path):
    app_port, dolores_port = free_port(), free_port()
    env = clean_env(
        {
            "PYTHON": sys.executable,
            "APP_PORT": str(app_port),
            "DOLORES_PORT": str(dolores_port),
            "RSVP_DB": str(tmp_path / "db.sqlite3"),
            "RSVP_DOLORES_DATA": str(tmp_path / "dolores-data"),
            "DOLORES_BIN": str(DOLORES_BIN),
        }
    )
    log = open(tmp_path / "run.log", "wb")
    process = spawn(
        [str(EXAMPLE / "run.sh")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        app = f"http://127.0.0.1:{app_port}"
        wait_until(lambda: answers(app + "/") or process.poll() is not None, what="the site")
        assert process.poll() is None, (tmp_path / "run.log").read_text()
        status, _, page = get(app + "/")
        assert status == 200 and f"http://127.0.0.1:{dolores_port}/dolores.js".encode() in page
        # The page's origin may load the client and stream from Dolores (CORS).
        status, headers, body = get(f"http://127.0.0.1:{dolores_port}/dolores.js", {"Origin": app})
        assert status == 200 and b"export class Dolores" in body
        assert {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == app
        status, _, body = get(app + "/api/contacts")
        assert status == 200 and b'"contacts"' in body
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    wait_until(lambda: refuses(app_port) and refuses(dolores_port), timeout=10, what="both servers to stop")


# ---- end to end in Chromium -----------------------------------------------------------


class Site:
    """The sample's Django site (runserver) on a free port, against ``dolores``."""

    def __init__(self, tmp: Path, port: int, dolores: DoloresServer, public_url: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "django.log"
        env = clean_env(
            {
                "DOLORES_SERVER": dolores.url,
                "DOLORES_PUBLIC_URL": public_url,
                "DOLORES_API_KEY": API_KEY,
                "RSVP_DB": str(tmp / "rsvp.sqlite3"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=EXAMPLE,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._log = open(self.log_path, "wb")
        self.process = spawn(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=EXAMPLE,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: answers(self.url + "/") or self.process.poll() is not None, what="the Django site")
            assert self.process.poll() is None, self.log()
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture
def rsvp(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM} (tests/python/run.sh installs Debian's)")
    app_port = free_port()
    dolores = DoloresServer(data=tmp_path / "dolores-data", cors_origins=[f"http://127.0.0.1:{app_port}"]).start()
    site = None
    try:
        site = Site(tmp_path, app_port, dolores, dolores.url)
        yield dolores, site
    finally:
        if site is not None:
            site.close()
        dolores.close()


@pytest.mark.e2e
def test_every_open_browser_sees_the_list_change_live(rsvp):
    from playwright.sync_api import expect, sync_playwright

    dolores, site = rsvp
    expect.set_options(timeout=WAIT_MS)
    forwarder = Forwarder(dolores.port)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = {}
        try:
            contexts = {name: browser.new_context() for name in ("a", "b", "c")}
            # C reaches Dolores through a connection the test can cut: its network drop.
            contexts["c"].route(
                f"{dolores.url}/**",
                lambda route: route.continue_(
                    url=route.request.url.replace(f":{dolores.port}/", f":{forwarder.port}/", 1)
                ),
            )
            # route() sees HTTP requests only, and the client's default transport opens a
            # WebSocket: C's page gets a WebSocket that dials the forwarder instead.
            contexts["c"].add_init_script(
                """
                const Native = window.WebSocket;
                window.WebSocket = class extends Native {
                  constructor(url, protocols) {
                    super(String(url).replace(":%d/", ":%d/"), protocols);
                  }
                };
                """
                % (dolores.port, forwarder.port)
            )
            for name, context in contexts.items():
                page = pages[name] = context.new_page()
                page.goto(site.url + "/")
                page.evaluate("window.neverReloaded = true")
            for page in pages.values():
                expect(page.locator("#status")).to_have_text("live")
            a, b, c = pages["a"], pages["b"], pages["c"]

            def row(page, name):
                return page.locator("#contacts tbody tr", has_text=name)

            # The form's fields are labelled, the guests field too.
            expect(a.get_by_label("Guests", exact=True)).to_have_value("0")

            # 1. A adds a contact: B and C show it, no reload.
            a.fill("#add [name=name]", "Ada Lovelace")
            a.fill("#add [name=email]", "ada@example.com")
            a.fill("#add [name=guests]", "1")
            a.click("#add button[type=submit]")
            expect(row(b, "Ada Lovelace")).to_have_count(1)
            expect(row(b, "Ada Lovelace")).to_contain_text("ada@example.com")
            expect(row(c, "Ada Lovelace")).to_have_count(1)

            # B edits it: A and C see the edit.
            row(b, "Ada Lovelace").get_by_role("button", name="Edit").click()
            editing = b.locator("#contacts tbody tr[data-editing]")
            editing.locator("select[name=attending]").select_option("maybe")
            editing.get_by_role("button", name="Save").click()
            expect(row(a, "Ada Lovelace")).to_contain_text("Maybe")
            expect(row(c, "Ada Lovelace")).to_contain_text("Maybe")

            # 2. C goes offline: its stream is cut and it cannot come back.
            contexts["c"].set_offline(True)
            forwarder.cut()
            expect(c.locator("#status")).not_to_have_text("live")

            # 3. Two changes while C is away, with a Dolores restart (kill -9, same data
            # dir and port) between them.
            a.fill("#add [name=name]", "Grace Hopper")
            a.click("#add button[type=submit]")
            expect(row(b, "Grace Hopper")).to_have_count(1)
            dolores.kill()
            dolores.restart()
            row(b, "Ada Lovelace").get_by_role("button", name="Remove").click()
            expect(row(a, "Ada Lovelace")).to_have_count(0)
            # Grace alone, without guests: one person, in the singular.
            expect(a.locator("#summary")).to_have_text("1 coming, 1 person in all")
            expect(row(b, "Grace Hopper")).to_have_count(1)
            for page in (a, b):
                expect(page.locator("#status")).to_have_text("live")
            # C missed both.
            expect(row(c, "Ada Lovelace")).to_have_count(1)
            expect(row(c, "Grace Hopper")).to_have_count(0)

            # 4. C comes back: both changes show up, in place — from its queue (it
            # refetches the one contact created, and not the whole list).
            fetched = []
            c.on("request", lambda request: fetched.append(request.url))
            forwarder.restore()
            contexts["c"].set_offline(False)
            expect(c.locator("#status")).to_have_text("live")
            expect(row(c, "Grace Hopper")).to_have_count(1)
            expect(row(c, "Ada Lovelace")).to_have_count(0)
            grace = row(a, "Grace Hopper").get_attribute("data-contact-id")
            assert f"{site.url}/api/contacts/{grace}" in fetched
            assert f"{site.url}/api/contacts" not in fetched

            # And C's own changes reach the others again.
            row(c, "Grace Hopper").get_by_role("button", name="Edit").click()
            editing = c.locator("#contacts tbody tr[data-editing]")
            editing.locator("input[name=guests]").fill("3")
            editing.get_by_role("button", name="Save").click()
            for page in (a, b):
                expect(row(page, "Grace Hopper").locator("td").nth(3)).to_have_text("3")
                expect(page.locator("#summary")).to_have_text("1 coming, 4 people in all")

            for name, page in pages.items():
                assert page.evaluate("window.neverReloaded") is True, f"{name} was reloaded"
                expect(page.locator("#contacts tbody tr")).to_have_count(1)
            SCREENSHOTS.mkdir(exist_ok=True)
            for name, page in pages.items():
                page.screenshot(path=str(SCREENSHOTS / f"rsvp-{name}.png"))

            # A phone, 390 px wide: the form and the list fit, nothing scrolls sideways.
            phone = pages["phone"] = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            phone.goto(site.url + "/")
            expect(phone.locator("#status")).to_have_text("live")
            expect(row(phone, "Grace Hopper")).to_have_count(1)
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"at 390 px the page is {width} px wide"
            phone.screenshot(path=str(SCREENSHOTS / "rsvp-phone.png"), full_page=True)
            # And a row being edited there.
            row(phone, "Grace Hopper").get_by_role("button", name="Edit").click()
            expect(phone.locator("#contacts tbody tr[data-editing] input[name=guests]")).to_have_value("3")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"at 390 px, editing, the page is {width} px wide"
            phone.screenshot(path=str(SCREENSHOTS / "rsvp-phone-editing.png"), full_page=True)
            phone.get_by_role("button", name="Cancel").click()
        except BaseException:
            SCREENSHOTS.mkdir(exist_ok=True)
            for name, page in pages.items():
                try:
                    page.screenshot(path=str(SCREENSHOTS / f"rsvp-failed-{name}.png"))
                except Exception:  # noqa: BLE001
                    pass
            print("---- django\n" + site.log()[-4000:] + "\n---- dolores\n" + dolores.log()[-4000:])
            raise
        finally:
            browser.close()
            forwarder.close()


@pytest.fixture
def rsvp_with_webhooks(tmp_path):
    """The site and a Dolores that sends it webhooks (signed with the api key), with a
    short presence grace."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM} (tests/python/run.sh installs Debian's)")
    app_port = free_port()
    dolores = DoloresServer(
        data=tmp_path / "dolores-data",
        cors_origins=[f"http://127.0.0.1:{app_port}"],
        args=[
            "--webhook-url", f"http://127.0.0.1:{app_port}/:webhook",
            "--presence-grace", "1s",
            "--webhook-max-backoff", "500ms",
        ],
    ).start()
    site = None
    try:
        site = Site(tmp_path, app_port, dolores, dolores.url)
        yield dolores, site
    finally:
        if site is not None:
            site.close()
        dolores.close()


@pytest.mark.e2e
def test_every_open_page_shows_how_many_people_are_here(rsvp_with_webhooks):
    from playwright.sync_api import expect, sync_playwright

    dolores, site = rsvp_with_webhooks
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = {}
        try:
            for name in ("a", "b"):
                pages[name] = browser.new_context().new_page()
                pages[name].goto(site.url + "/")
            a, b = pages["a"], pages["b"]
            for page in (a, b):
                expect(page.locator("#status")).to_have_text("live")
                expect(page.locator("#here")).to_have_text("2 people here")
            # B leaves: once the grace is over, A is alone, in the singular.
            b.context.close()
            del pages["b"]
            expect(a.locator("#here")).to_have_text("1 person here")
            # And a third page comes: both see two again.
            c = pages["c"] = browser.new_context().new_page()
            c.goto(site.url + "/")
            for page in (a, c):
                expect(page.locator("#here")).to_have_text("2 people here")
        except BaseException:
            SCREENSHOTS.mkdir(exist_ok=True)
            for name, page in pages.items():
                try:
                    page.screenshot(path=str(SCREENSHOTS / f"rsvp-here-failed-{name}.png"))
                except Exception:  # noqa: BLE001
                    pass
            print("---- django\n" + site.log()[-4000:] + "\n---- dolores\n" + dolores.log()[-4000:])
            raise
        finally:
            browser.close()
