"""The Django section of clients/python/README.md, done as its reader would: a project
from `django-admin startproject`, the README's settings, rules, view, urls and template
pasted in as they are written (only the ports changed), Dolores started with the
README's `--cors-origins`, and the page in headless Chromium hearing a message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest
from dolores import Client
from harness import API_KEY, REPO, DoloresServer, clean_env, free_port, spawn, wait_until

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic"]
WAIT_MS = 20_000

README = (REPO / "clients" / "python" / "README.md").read_text()
SECTION = README[README.index("\n## Django\n") :]


def blocks(language: str) -> list:
    return re.findall(r"```%s\n(.*?)\n```" % language, SECTION, flags=re.S)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def files_of(block: str) -> dict:
    """Splits the README's python block at its `# path.py` comments."""
    files, current = {}, None
    for line in block.split("\n"):
        named = re.match(r"^# ([\w/]+\.py)\b", line)
        if named:
            current = named.group(1)
            files[current] = []
        elif current is not None:
            files[current].append(line)
    return {name: "\n".join(lines).strip() + "\n" for name, lines in files.items()}


@pytest.mark.e2e
def test_the_readmes_django_page_hears_a_track_live(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    app_port = free_port()
    # `dolores serve --api-key dev-key --cors-origins http://127.0.0.1:8000,…`
    serve = next(line for line in SECTION.split("\n") if line.startswith("dolores serve"))
    origins = re.search(r"--cors-origins (\S+)", serve).group(1).replace(":8000", f":{app_port}").split(",")
    assert f"http://127.0.0.1:{app_port}" in origins, serve
    dolores = DoloresServer(cors_origins=origins).start()
    site = None
    try:
        project = tmp_path / "project"
        project.mkdir()
        subprocess.run(
            [sys.executable, "-m", "django", "startproject", "mysite", str(project)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        ported = lambda text: text.replace("http://127.0.0.1:8007", dolores.url).replace('"dev-key"', f'"{API_KEY}"')  # noqa: E731
        files = files_of(blocks("python")[0])
        assert set(files) == {"settings.py", "myapp/rules.py", "myapp/views.py", "urls.py"}, set(files)
        settings = project / "mysite" / "settings.py"
        settings.write_text(settings.read_text() + "\n" + ported(files["settings.py"]))
        (project / "mysite" / "urls.py").write_text(files["urls.py"])
        (project / "myapp" / "templates" / "myapp").mkdir(parents=True)
        (project / "myapp" / "__init__.py").write_text("")
        (project / "myapp" / "rules.py").write_text(files["myapp/rules.py"])
        (project / "myapp" / "views.py").write_text(files["myapp/views.py"])
        template = next(b for b in blocks("html") if "myapp/templates/myapp/live.html" in b)
        (project / "myapp" / "templates" / "myapp" / "live.html").write_text(ported(template))

        env = clean_env({"PYTHONUNBUFFERED": "1"})
        migrate = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=project, env=env, capture_output=True, text=True, timeout=120
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        log = open(tmp_path / "django.log", "wb")
        site = spawn(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{app_port}"],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        app = f"http://127.0.0.1:{app_port}"
        wait_until(lambda: answers(app + "/live/") or site.poll() is not None, what="the Django site")
        assert site.poll() is None, (tmp_path / "django.log").read_text()

        with sync_playwright() as p, Client(dolores.url, api_key=API_KEY) as backend:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(app + "/live/")
                # Subscribed through the README's views (and so past may_listen), stream open.
                wait_until(lambda: backend.stats()["streams"]["ws"] >= 1, what="the page's stream")
                backend.update(":news", "hello")
                expect(page.locator("#news li")).to_have_text(['"hello"'], timeout=WAIT_MS)
                assert errors == []
            except BaseException:
                print("---- django\n" + (tmp_path / "django.log").read_text()[-4000:] + "\n---- dolores\n" + dolores.log()[-4000:])
                raise
            finally:
                browser.close()
    finally:
        if site is not None:
            site.terminate()
            site.wait(10)
            log.close()
        dolores.close()
