"""`lora-sdpo push` through the real huggingface_hub client against a small Hub on 127.0.0.1.

The server implements only what the client calls for a push (found in huggingface_hub's hf_api.py
and _commit_api.py): repo info, repo create, branch create, README YAML validation, preupload
(which answers "regular" for every file, so the client commits contents inline in the NDJSON commit
instead of going through LFS or Xet), and the commit itself. It records every request, so a test
can assert what arrived, and that a refused push sent nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import FAKE_TOKEN, cli
from lora_sdpo.hub import PushError, never_upload, push


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body=None, headers=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                m = re.fullmatch(r"/api/models/([^/]+/[^/?]+)(/revision/[^?]+)?(\?.*)?", self.path)
                if not m:
                    return self._reply(404, {"error": "unknown endpoint"})
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._reply(200, {"id": m.group(1), "private": repo["private"], "sha": repo["sha"], "siblings": []})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                hub.auth.add(self.headers.get("Authorization", ""))
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {FAKE_TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}"
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo"})
                    hub.repos[repo_id] = {"private": req.get("visibility", "public") == "private", "sha": "0" * 40, "branches": {"main": {}}}
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":
                    text = json.loads(body)["content"]
                    ModelCard(text)  # parses the metadata; the real Hub rejects malformed YAML too
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^?]+)(\?.*)?", self.path)
                if not m or m.group(1) not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo, kind, rev = hub.repos[m.group(1)], m.group(2), m.group(3)
                if kind == "branch":
                    if rev in repo["branches"]:
                        return self._reply(409, {"error": "Reference already exists"})
                    repo["branches"][rev] = dict(repo["branches"]["main"])
                    return self._reply(200, {})
                if rev not in repo["branches"]:
                    return self._reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                for item in lines[1:]:
                    assert item["key"] == "file", item  # inline contents only
                    repo["branches"][rev][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo["sha"] = hashlib.sha1(body).hexdigest()
                url = f"http://{self.headers['Host']}/{m.group(1)}/commit/{repo['sha']}"
                return self._reply(200, {"commitUrl": url, "commitOid": repo["sha"]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def uploads(self) -> list[str]:
        return [p for m, p in self.requests if "/preupload/" in p or "/commit/" in p]


@pytest.fixture
def hub():
    h = FakeHub()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def push_cli(hub: FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`lora-sdpo push` in a subprocess, online against the fake Hub, with a fake token in HF_TOKEN."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HOME": str(tmp_path / "hf_home"),  # no token file from the real home, nothing written there
        "NO_PROXY": "127.0.0.1,localhost",
        "TQDM_DISABLE": "1",
    }
    return subprocess.run([sys.executable, "-m", "lora_sdpo", "push", *args], capture_output=True, text=True, timeout=300, env=env)


def _card_meta(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def _assert_token_nowhere(*folders: Path, outputs=()):
    for text in outputs:
        assert FAKE_TOKEN not in text
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file():
                assert FAKE_TOKEN.encode() not in p.read_bytes(), p


@pytest.fixture(scope="module")
def merged_export(two_step_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "export"
    cli("export", str(two_step_run), "--output", str(out))
    return out


def test_push_export_is_private_by_default_and_keeps_the_token_out(hub, merged_export, two_step_run, tmp_path):
    dry = push_cli(hub, tmp_path, str(merged_export), "--repo-id", "me/sdpo-test", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert hub.requests == []  # a dry run talks to nobody
    assert "model.safetensors" in dry.stdout and "MB" in dry.stdout and "library_name: transformers" in dry.stdout

    proc = push_cli(hub, tmp_path, str(merged_export), "--repo-id", "me/sdpo-test")
    assert proc.returncode == 0, proc.stderr
    repo = hub.repos["me/sdpo-test"]
    assert repo["private"] is True
    arrived = repo["branches"]["main"]
    on_disk = {str(p.relative_to(merged_export)): p.read_bytes() for p in merged_export.rglob("*") if p.is_file()}
    assert arrived == on_disk  # every file of the export, byte for byte, and nothing else
    meta = _card_meta(arrived["README.md"].decode())
    assert {"sdpo", "dpo", "lora", "qlora"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert hub.auth == {f"Bearer {FAKE_TOKEN}"}  # the token came from HF_TOKEN, through huggingface_hub
    _assert_token_nowhere(two_step_run, merged_export, tmp_path, outputs=(dry.stdout, dry.stderr, proc.stdout, proc.stderr))


def test_an_existing_public_repo_needs_public(hub, merged_export, tmp_path):
    hub.repos["me/public-model"] = {"private": False, "sha": "1" * 40, "branches": {"main": {}}}
    proc = push_cli(hub, tmp_path, str(merged_export), "--repo-id", "me/public-model")
    assert proc.returncode == 2 and "is public" in proc.stderr and "--public" in proc.stderr
    assert "Traceback" not in proc.stderr and hub.uploads() == [] and hub.repos["me/public-model"]["branches"]["main"] == {}
    proc = push_cli(hub, tmp_path, str(merged_export), "--repo-id", "me/public-model", "--public")
    assert proc.returncode == 0, proc.stderr
    assert "export.json" in hub.repos["me/public-model"]["branches"]["main"]


def test_push_a_run_directory_exports_first(hub, two_step_run, tmp_path):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in two_step_run.rglob("*"))
    proc = push_cli(hub, tmp_path, str(two_step_run), "--repo-id", "me/sdpo-adapter", "--what", "adapter", "--revision", "v1")
    assert proc.returncode == 0, proc.stderr
    files = hub.repos["me/sdpo-adapter"]["branches"]["v1"]
    assert hub.repos["me/sdpo-adapter"]["branches"]["main"] == {}
    assert {"adapter_model.safetensors", "adapter_config.json", "previous_adapters/step-1/adapter_model.safetensors",
            "tokenizer.json", "README.md", "recipe.toml", "export.json"} <= set(files)
    assert not any(never_upload(f) for f in files)
    card = files["README.md"].decode()
    assert "It applies to M_1, not to S" in card and "me/sdpo-adapter" in card
    assert sorted((str(p), p.stat().st_mtime_ns) for p in two_step_run.rglob("*")) == before  # the run is untouched
    _assert_token_nowhere(two_step_run, tmp_path, outputs=(proc.stdout, proc.stderr))


def test_unfinished_or_foreign_folders_are_refused(two_step_run, merged_export, tmp_path):
    # refused before any network: these need no server
    unfinished = tmp_path / "run"
    shutil.copytree(two_step_run, unfinished, ignore=shutil.ignore_patterns("hf_cache", "model", "data"))
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(PushError, match="not finished"):
        push(unfinished, "me/x", dry_run=True)
    damaged = tmp_path / "damaged"
    shutil.copytree(merged_export, damaged)
    (damaged / "export.json").unlink()
    with pytest.raises(PushError, match="not a finished lora-sdpo export"):
        push(damaged, "me/x")
    shutil.copytree(merged_export, tmp_path / "tampered")
    marker = json.loads((tmp_path / "tampered" / "export.json").read_text())
    marker["files"]["optimizer.pt"] = 3
    (tmp_path / "tampered" / "optimizer.pt").write_bytes(b"abc")
    (tmp_path / "tampered" / "export.json").write_text(json.dumps(marker))
    with pytest.raises(PushError, match="never uploads"):
        push(tmp_path / "tampered", "me/x")
    with pytest.raises(PushError, match="OWNER/NAME"):
        push(merged_export, "no-owner")
