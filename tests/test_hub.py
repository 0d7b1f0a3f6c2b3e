"""`moetune push` against a local fake of the Hub endpoints huggingface_hub uses for create_repo / preupload /
commit (regular uploads): what arrives, the card, and clear failures that leave the run dir untouched."""

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny_runs import make_run

from moetune.cli import main
from moetune.errors import MoetuneError
from moetune.hub import files_to_upload, push_run


TOKEN = "hf_fakeTokenThatMustNeverBePrinted123"


class FakeHub:
    """Repos live in memory: {repo_id: {branch: {path: bytes}}}. `forbidden` repos answer 403, `dropping` repos
    close the connection on commit without answering."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool] = {}
        self.forbidden: set[str] = set()
        self.dropping: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, body: bytes, authorized: bool):
        if not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo in self.forbidden:
                return 403, {"error": "You don't have the rights to create a model under this namespace"}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
            self.private[repo] = payload.get("visibility") == "private" or bool(payload.get("private"))
            return 200, {"url": f"{self.url}/{repo}"}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(\w+)/(.+))?", path)
        if match is None:
            return 404, {"error": f"fake hub: no route {method} {path}"}
        repo, action, rest = match.groups()
        if repo in self.forbidden:
            return 403, {"error": "Forbidden"}
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if method == "POST" and action == "branch":
            self.repos[repo].setdefault(rest, dict(self.repos[repo]["main"]))
            return 200, {}
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and action == "commit":
            if repo in self.dropping:
                return None, None
            branch = self.repos[repo].setdefault(rest, {})
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    branch[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        return 404, {"error": f"fake hub: no route {method} {path}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _handle(self, method: str):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        status, payload = self.server.hub.route(method, self.path.split("?")[0], body, authorized)
        if status is None:  # a dropped connection: no response at all
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub, with huggingface_hub pointed at it and the token in HF_TOKEN (no saved login)."""
    from huggingface_hub import constants

    fake = FakeHub()
    fake.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # read once at import; the env var is for subprocesses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # regular uploads only
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    fake.thread.join(timeout=5)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA run dir with everything training leaves behind, checkpoints and optimizer state included."""
    run = make_run(tmp_path_factory.mktemp("hub") / "run", tiny_model_dir("mixtral"), targets=["experts", "attention"],
                   steps=1)
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    (run / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"old weights")
    (run / "training_args.bin").write_bytes(b"args")
    (run / "trainer_state.json").write_text("{}")
    (run / "routing.json").write_text(json.dumps({"tokens": 10, "layers": []}))
    (run / ".moetune.lock").write_text("")
    (run / "README.md").write_text("old card")
    return run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_to_upload_skip_checkpoints_and_training_state(run_dir):
    assert files_to_upload(run_dir) == ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                                        "metrics.json", "recipe.yaml", "routing.json", "tokenizer.json",
                                        "tokenizer_config.json"]


def test_push_uploads_the_run_and_a_card(hub, run_dir, capsys):
    before = _snapshot(run_dir)
    assert main(["push", str(run_dir), "me/tiny-moe", "--private"]) == 0
    files = hub.repos["me/tiny-moe"]["main"]
    assert set(files) == {".gitattributes", "README.md", *files_to_upload(run_dir)}
    assert files["adapter_model.safetensors"] == (run_dir / "adapter_model.safetensors").read_bytes()
    assert hub.private["me/tiny-moe"]
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "- moe" in card and "- moetune" in card and "- mixtral" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-moe"' in card
    assert "vLLM" in card  # expert LoRA: the serving note
    assert _snapshot(run_dir) == before  # the local card is not rewritten
    out = capsys.readouterr()
    assert "me/tiny-moe" in out.out and TOKEN not in out.out + out.err

    # Again to an existing repo, on a new branch.
    assert main(["push", str(run_dir), "me/tiny-moe", "--revision", "v2"]) == 0
    assert "adapter_config.json" in hub.repos["me/tiny-moe"]["v2"]


def test_push_merged_uploads_a_plain_checkpoint(hub, run_dir):
    before = _snapshot(run_dir)
    push_run(run_dir, "me/tiny-moe-merged", merged=True, merge_dtype="float32")
    files = hub.repos["me/tiny-moe-merged"]["main"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_report.json", "README.md"} <= set(files)
    assert "adapter_config.json" not in files
    assert "library_name: transformers" in files["README.md"].decode()
    assert _snapshot(run_dir) == before
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".moetune-push-")]


@pytest.mark.parametrize("problem, message", [
    ("no token", r"no Hugging Face token found: set HF_TOKEN or run `hf auth login`"),
    ("no rights", r"the Hub refused access to 'someone-else/their-model' \(HTTP 403\)"),
    ("dropped", r"the connection to the Hub \(http://127\.0\.0\.1:\d+\) failed while pushing to 'me/flaky'"),
])
def test_push_failures_are_clear_and_leave_the_run_alone(hub, run_dir, monkeypatch, capsys, problem, message):
    repo = {"no token": "me/tiny-moe", "no rights": "someone-else/their-model", "dropped": "me/flaky"}[problem]
    if problem == "no token":
        monkeypatch.delenv("HF_TOKEN")
    hub.forbidden.add("someone-else/their-model")
    hub.dropping.add("me/flaky")
    before = _snapshot(run_dir)
    assert main(["push", str(run_dir), repo]) == 1
    out = capsys.readouterr()
    assert re.search(message, out.err), out.err
    assert out.err.count("\n") == 1  # one line, no traceback
    assert TOKEN not in out.out + out.err
    assert _snapshot(run_dir) == before
    with pytest.raises(MoetuneError):
        push_run(run_dir, repo)
