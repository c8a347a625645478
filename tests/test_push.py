"""Pushing to the Hub without a network: the real HfApi calls against a local stand-in Hub.

``StandInHub`` is an HTTP server on 127.0.0.1 that speaks the part of the Hub API a push uses:
repo creation, branch creation, README metadata validation, the preupload endpoint, the git-LFS
batch API with a basic-transfer upload URL, and the NDJSON commit endpoint. It keeps every
request and the files each commit wrote, so the tests check what a real Hub would have
received: file names and bytes, the commit message, the visibility, and that the token went only
into Authorization headers. ``huggingface_hub`` runs unmodified; only its endpoint, offline flag
and Xet switch (Xet storage has no local stand-in) are pointed at the stand-in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

from hf_soups.cli import main
from hf_soups.errors import HfSoupsError
from hf_soups.push import HubPushError, push_folder

TOKEN = "hf_FAKE_TOKEN_123"
FORBIDDEN_REPO = "acme/forbidden"


class StandInHub:
    """A minimal Hub: repos -> branches -> {path: bytes}, plus a log of every request."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                hub.handle(self, "POST")

            def do_PUT(self):
                hub.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- plumbing ------------------------------------------------------------------------

    @staticmethod
    def read_body(request: BaseHTTPRequestHandler) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(request.rfile.readline().strip(), 16):
                chunks.append(request.rfile.read(size))
                request.rfile.readline()
            request.rfile.readline()
            return b"".join(chunks)
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(request.path).path
        body = self.read_body(request)
        with self.lock:
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "authorization": request.headers.get("Authorization"),
                    "headers": dict(request.headers),
                    "body": body,
                }
            )
            status, payload = self.route(method, path, body, request.headers)
        self.reply(request, status, payload)

    def route(self, method: str, path: str, body: bytes, headers) -> tuple[int, dict]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "PUT" and parts[0] == "lfs-storage":
            # The storage URL carries no Hub credentials, as S3's pre-signed URLs do not.
            oid = parts[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[oid] = body
            return 200, {}
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if parts[:3] == ["api", "repos", "create"]:
            return self.create_repo(json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            ModelCard(json.loads(body)["content"])  # raises on metadata huggingface_hub rejects
            return 200, {"errors": [], "warnings": []}
        if parts[0] == "api" and parts[1] == "models":
            repo_id, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            branches = self.repos[repo_id]["branches"]
            if action == "branch":
                if revision in branches:
                    return 409, {"error": "Branch already exists"}
                branches[revision] = dict(branches["main"])
                return 200, {}
            if revision not in branches:
                return 404, {"error": f"Invalid rev id: {revision}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [self.upload_mode(f) for f in files]}
            if action == "commit":
                return self.commit(repo_id, revision, body)
        if path.endswith(".git/info/lfs/objects/batch"):
            request = json.loads(body)
            return 200, {
                "transfer": "basic",
                "objects": [
                    {
                        "oid": obj["oid"],
                        "size": obj["size"],
                        "actions": {"upload": {"href": f"{self.url}/lfs-storage/{obj['oid']}"}},
                    }
                    for obj in request["objects"]
                ],
            }
        return 404, {"error": f"stand-in Hub: no route for {method} {path}"}

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": repo_id}
        self.repos[repo_id] = {
            "visibility": payload.get("visibility"),
            "type": payload.get("type"),
            "branches": {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}},
        }
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    @staticmethod
    def upload_mode(file: dict) -> dict:
        lfs = file["path"].endswith(".safetensors") or file["size"] > 10_000_000
        return {
            "path": file["path"],
            "uploadMode": "lfs" if lfs else "regular",
            "shouldIgnore": False,
        }

    def commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        if repo_id == FORBIDDEN_REPO:
            # A careless server that echoes the credentials it got: they must not reach the user.
            return 403, {"error": f"token {TOKEN} has no write access to {repo_id}"}
        written = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                written[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                content = self.lfs.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    return 400, {"error": f"LFS object of {value['path']} was not uploaded"}
                written[value["path"]] = content
            else:
                return 400, {"error": f"unexpected operation {line['key']}"}
        self.repos[repo_id]["branches"][revision].update(written)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append(
            {"repo_id": repo_id, "revision": revision, "header": header, "files": written}
        )
        return 200, {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = StandInHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # No token from this machine's environment or login: only what a test passes.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.close()


def make_model_folder(root: Path, name: str = "soup") -> Path:
    """A small merged folder: safetensors weights, config, recipe, a plot and a nested file."""
    folder = root / name
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file(
        {"encoder.weight": torch.randn(16, 8, generator=generator), "head.bias": torch.zeros(3)},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["ViTForImageClassification"]})
    )
    recipe = {
        "library": "hf_soups 0.1.0",
        "method": "weighted_average",
        "parameters": {"weights": [0.5, 0.5]},
        "citation": None,
        "ingredients": [
            {"source": "acme/ft-a", "revision": "1" * 40},
            {"source": "acme/ft-b", "revision": "2" * 40},
        ],
        "base": None,
        "dtype": None,
        "soup": {"method": "uniform", "weights": [0.5, 0.5]},
        "scores": {
            "uniform soup": {
                "test": {
                    "metrics": {"accuracy": 0.9},
                    "intervals": {"accuracy": [0.88, 0.92]},
                    "n": 1000,
                }
            }
        },
        "plots": ["curve.png"],
    }
    (folder / "soup.json").write_text(json.dumps(recipe, indent=2))
    (folder / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("trained on 2 cores\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


def assert_token_confined(hub: StandInHub, caplog) -> None:
    """The token was used (Authorization headers to the Hub API) and appears nowhere else."""
    secret = TOKEN.encode()
    api_requests = [r for r in hub.requests if r["path"].startswith("/api/")]
    assert api_requests and all(r["authorization"] == f"Bearer {TOKEN}" for r in api_requests)
    for request in hub.requests:
        assert secret not in request["body"], request["path"]
        assert TOKEN not in request["path"]
        others = {k: v for k, v in request["headers"].items() if k.lower() != "authorization"}
        assert TOKEN not in json.dumps(others), request["path"]
    storage = [r for r in hub.requests if r["path"].startswith("/lfs-storage/")]
    assert all(r["authorization"] is None for r in storage)
    for repo in hub.repos.values():
        for files in repo["branches"].values():
            assert all(secret not in content for content in files.values())
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in (record.exc_text or "")


def test_push_folder_uploads_the_folder_in_one_commit(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    folder = make_model_folder(tmp_path)
    expected = local_files(folder)  # before the push adds README.md

    commit = push_folder(
        folder, "acme/my-soup", private=True, token=TOKEN, commit_message="Add the uniform soup"
    )

    repo = hub.repos["acme/my-soup"]
    assert repo["visibility"] == "private" and repo["type"] is None  # a model repo
    (made,) = hub.commits
    assert made["header"]["summary"] == "Add the uniform soup"
    assert made["revision"] == "main"
    assert commit.commit_url == f"{hub.url}/acme/my-soup/commit/{commit.oid}"
    # The card was rendered because the folder had a recipe and no README.md.
    assert (folder / "README.md").is_file()
    expected["README.md"] = (folder / "README.md").read_bytes()
    assert made["files"] == expected  # every file, byte for byte; .git left out
    # Named after the repository (the model-index, which would repeat the name, is absent: the
    # recipe's eval set names no Hub dataset).
    assert ModelCard(expected["README.md"].decode()).text.lstrip().startswith("# my-soup\n")
    # Weights went through the LFS protocol, small files inline, as on the Hub.
    assert set(hub.lfs) == {hashlib.sha256(expected["model.safetensors"]).hexdigest()}
    assert any(r["path"] == "/api/validate-yaml" for r in hub.requests)
    assert_token_confined(hub, caplog)


def test_push_to_a_new_branch_and_again(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    folder = make_model_folder(tmp_path)
    push_folder(folder, "acme/exp", token=TOKEN, revision="sweep-1")
    (folder / "extra" / "notes.txt").write_text("second run\n")
    push_folder(folder, "acme/exp", token=TOKEN, revision="sweep-1", commit_message="again")

    repo = hub.repos["acme/exp"]
    assert repo["visibility"] is None  # private=None: the account's default
    assert [c["revision"] for c in hub.commits] == ["sweep-1", "sweep-1"]
    assert set(repo["branches"]["main"]) == {".gitattributes"}  # main untouched
    assert repo["branches"]["sweep-1"]["extra/notes.txt"] == b"second run\n"
    branch_calls = [r for r in hub.requests if "/branch/" in r["path"]]
    assert [r["path"] for r in branch_calls] == ["/api/models/acme/exp/branch/sweep-1"] * 2
    assert hub.commits[1]["header"]["summary"] == "again"
    assert hub.commits[0]["header"]["summary"] == "Upload uniform soup made with hf_soups 0.1.0"
    assert_token_confined(hub, caplog)


def test_hub_errors_do_not_leak_the_token(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    folder = make_model_folder(tmp_path)
    with pytest.raises(HubPushError) as caught:
        push_folder(folder, FORBIDDEN_REPO, token=TOKEN)
    message = str(caught.value)
    assert FORBIDDEN_REPO in message and "commit the folder" in message
    assert "no write access" in message and "<token>" in message  # server text kept, redacted
    assert TOKEN not in "".join(traceback.format_exception(caught.value))
    assert not hub.commits
    assert_token_confined(hub, caplog)


def test_a_folder_containing_the_token_is_refused(hub, tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path)
    recipe = json.loads((folder / "soup.json").read_text())
    recipe["environment"] = {"HF_TOKEN": TOKEN}
    (folder / "soup.json").write_text(json.dumps(recipe))
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token as most users have it
    with pytest.raises(HubPushError, match="soup.json") as caught:
        push_folder(folder, "acme/leaky")
    assert TOKEN not in str(caught.value)
    assert not hub.requests  # refused before anything was sent


def test_push_refuses_offline_mode_and_bad_input(hub, tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path)
    with pytest.raises(HubPushError, match="not a valid Hub repo id"):
        push_folder(folder, "acme/bad name!", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        push_folder(tmp_path / "no-such-folder", "acme/x", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HfSoupsError, match="offline"):
        push_folder(folder, "acme/x", token=TOKEN)
    assert not hub.requests


def test_push_command(hub, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    folder = make_model_folder(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the CLI takes the token from the environment only
    code = main(
        [
            "push",
            str(folder),
            "acme/cli-soup",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "from the CLI",
        ]
    )
    assert code == 0
    (made,) = hub.commits
    assert made["header"]["summary"] == "from the CLI" and made["revision"] == "v1"
    assert hub.repos["acme/cli-soup"]["visibility"] == "private"
    assert made["files"] == local_files(folder)
    out, err = capsys.readouterr()
    assert "/commit/" in out and TOKEN not in out + err
    assert_token_confined(hub, caplog)

    assert main(["push", str(folder), FORBIDDEN_REPO]) == 2
    out, err = capsys.readouterr()
    assert "no write access" in err and TOKEN not in out + err


def test_soup_push_to_hub(hub, tmp_path, caplog):
    """``Soup.push_to_hub`` saves the soup with its card and pushes it through ``push_folder``."""
    from tiny import make_vit_folder

    from hf_soups.soup import SoupBuilder

    caplog.set_level(logging.DEBUG)
    folders = [make_vit_folder(tmp_path / f"ft{i}", seed=i) for i in range(2)]
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).uniform()
    soup.push_to_hub("acme/uniform", token=TOKEN, private=True)

    (made,) = hub.commits
    assert hub.repos["acme/uniform"]["visibility"] == "private"
    files = made["files"]
    assert {"model.safetensors", "config.json", "soup.json", "README.md"} <= set(files)
    recipe = json.loads(files["soup.json"])
    assert recipe["soup"]["method"] == "uniform"
    card = ModelCard(files["README.md"].decode())
    assert "model-soup" in card.data.tags
    # Local ingredients are published by their folder names, in the card and the recipe.
    assert all(f.name in card.text and str(f) not in card.text for f in folders)
    assert [r["source"] for r in recipe["ingredients"]] == [f.name for f in folders]
    assert_token_confined(hub, caplog)


# -- failures are one line, found before anything changes ------------------------------------

# huggingface_hub's HTTP library (httpx, or the fork it pins), whatever its import name.
httpx = sys.modules[HfHubHTTPError.__bases__[0].__module__]


def folder_state(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def unreachable_hub(monkeypatch):
    """An endpoint where nothing listens: connections are refused, as with the network down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return url


def test_an_unreachable_hub_is_one_line_and_changes_nothing(unreachable_hub, tmp_path, capsys):
    folder = make_model_folder(tmp_path)
    before = folder_state(folder)
    with pytest.raises(HubPushError) as caught:
        push_folder(folder, "acme/offline", token=TOKEN)
    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message
    assert message.startswith("could not create the repository for acme/offline: ConnectError")
    assert folder_state(folder) == before  # no README.md written

    code = main(["push", str(folder), "acme/offline"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("hf-soups push: error: could not create the repository")
    assert folder_state(folder) == before


def test_a_refused_token_is_one_line_and_changes_nothing(hub, tmp_path):
    folder = make_model_folder(tmp_path)
    before = folder_state(folder)
    with pytest.raises(HubPushError) as caught:
        push_folder(folder, "acme/soup", token="hf_WRONG_TOKEN_456")
    message = str(caught.value)
    assert "\n" not in message and "hf_WRONG_TOKEN_456" not in message
    assert message.startswith("could not create the repository for acme/soup: ")
    assert "401" in message
    assert folder_state(folder) == before
    assert [r["path"] for r in hub.requests] == ["/api/repos/create"]  # no file was sent


def test_a_refused_commit_writes_no_card_into_the_folder(hub, tmp_path):
    folder = make_model_folder(tmp_path)
    before = folder_state(folder)
    with pytest.raises(HubPushError, match="commit the folder"):
        push_folder(folder, FORBIDDEN_REPO, token=TOKEN)
    assert folder_state(folder) == before


def test_repository_not_found_is_one_line(hub, tmp_path, monkeypatch):
    def not_found(*args, **kwargs):
        request = httpx.Request("POST", f"{hub.url}/api/repos/create")
        response = httpx.Response(404, request=request, text=f"token {TOKEN}\nnot found")
        raise RepositoryNotFoundError(
            f"404 for token {TOKEN}\nRepository Not Found", response=response
        )

    monkeypatch.setattr(HfApi, "create_repo", not_found)
    folder = make_model_folder(tmp_path)
    with pytest.raises(HubPushError) as caught:
        push_folder(folder, "acme/gone", token=TOKEN)
    message = str(caught.value)
    assert "RepositoryNotFoundError" in message and "\n" not in message
    assert TOKEN not in message and "<token>" in message


def test_soup_push_checks_the_hub_before_merging(unreachable_hub, tmp_path, monkeypatch):
    from tiny import make_vit_folder

    import hf_soups.soup
    from hf_soups.soup import SoupBuilder

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before knowing the push could happen")

    monkeypatch.setattr(hf_soups.soup, "merge", no_merge)
    folders = [make_vit_folder(tmp_path / f"ft{i}", seed=i) for i in range(2)]
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).uniform()
    with pytest.raises(HubPushError, match="could not create the repository"):
        soup.push_to_hub("acme/uniform", token=TOKEN, work_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1"]


def test_the_old_import_path_is_the_hub_package():
    import hf_soups.hub
    import hf_soups.push

    assert hf_soups.push.push_folder is hf_soups.hub.push_folder is push_folder
    assert hf_soups.push.HubPushError is hf_soups.hub.HubPushError is HubPushError


def test_a_symlink_out_of_the_folder_is_refused(hub, tmp_path):
    folder = make_model_folder(tmp_path)
    secret = tmp_path / "private.txt"
    secret.write_text("not for the Hub\n")
    (folder / "notes.txt").symlink_to(secret)
    before = folder_state(folder)
    with pytest.raises(HubPushError, match="notes.txt link"):
        push_folder(folder, "acme/leak", token=TOKEN)
    assert not hub.requests and folder_state(folder) == before

    # A link within the folder publishes a file that is in the folder anyway.
    (folder / "notes.txt").unlink()
    (folder / "notes.txt").symlink_to(folder / "extra" / "notes.txt")
    push_folder(folder, "acme/fine", token=TOKEN)
    (made,) = hub.commits
    assert made["files"]["notes.txt"] == b"trained on 2 cores\n"
