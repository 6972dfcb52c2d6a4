"""The backend API against its OpenAPI document (docs/openapi.json, served as
/api/v1/openapi.json), fuzzed by schemathesis: every operation, positive and negative
cases, a bounded number of each. Any server error, an undocumented status, or an answer
that does not match its documented schema fails the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import API_KEY, REPO, TOKEN_SECRET, DoloresServer

DOCUMENT = REPO / "docs" / "openapi.json"
#: Cases per operation: enough to reach every documented answer, while the whole run
#: stays around ten seconds against a debug build.
MAX_EXAMPLES = 30
#: A fixed seed: the same cases on every run, so a failure can be replayed.
SEED = 1
#: What every answer is held to. `negative_data_rejection` (schema-violating input must be
#: refused) waits for the Idempotency-Key check: until then a key outside 1-255 printable
#: ASCII is ignored, not refused.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]


def test_the_served_document_is_docs_openapi_json_and_needs_no_key() -> None:
    server = DoloresServer().start()
    try:
        # The run's own pool sends no api key.
        served = server.request("GET", "/api/v1/openapi.json")
        assert served.status_code == 200
        assert served.json() == json.loads(DOCUMENT.read_text("utf-8"))
    finally:
        server.close()


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    # A token secret, so that POST /api/v1/tokens can answer 200 too.
    server = DoloresServer(token_secret=TOKEN_SECRET).start()
    try:
        run = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run",
                # The file, which the test above holds equal to what the server serves:
                # loaded from the server's URL, schemathesis leaves out the operation
                # that serves the document.
                str(DOCUMENT),
                "--url", server.url,
                "--header", f"Authorization: Bearer {API_KEY}",
                "--checks", ",".join(CHECKS),
                "--max-examples", str(MAX_EXAMPLES),
                "--seed", str(SEED),
                "--generation-database", "none",
                "--request-timeout", "10",
                "--no-color",
                "--output-truncate", "false",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        report = run.stdout + run.stderr
        assert run.returncode == 0, report
        # Every operation ran (a document schemathesis could not read would test nothing).
        operations = sum(len(ops) for ops in json.loads(DOCUMENT.read_text("utf-8"))["paths"].values())
        assert f"Tested: {operations}" in report, report
    finally:
        server.close()
