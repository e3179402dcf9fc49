"""The local Hub server, exercised through the real huggingface_hub client."""

from __future__ import annotations

import itertools
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "hf_test_token"
OTHER = "hf_other_token"
_names = itertools.count()


@pytest.fixture
def folder(tmp_path) -> Path:
    """A small folder with a subfolder, to upload."""
    root = tmp_path / "upload"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"r": 4}')
    (root / "README.md").write_text("---\nlicense: mit\n---\n# demo\n")
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return root


@pytest.fixture
def repo_id(hf_api) -> str:
    """A fresh empty public repo owned by alice (the server lives for the whole session)."""
    name = f"alice/repo-{next(_names)}"
    hf_api.create_repo(name)
    return name


def _download(hub, repo_id, filename, **kwargs):
    kwargs.setdefault("token", TOKEN)
    return hf_hub_download(repo_id, filename, endpoint=hub.url, **kwargs)


def test_whoami(hf_api, hub_server):
    assert hf_api.whoami()["name"] == "alice"
    assert HfApi(endpoint=hub_server.url, token=OTHER).whoami()["name"] == "bob"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub_server.url, token="hf_wrong").whoami()
    assert err.value.response.status_code == 401


def test_create_repo_exist_ok_and_conflict(hf_api, hub_server):
    url = hf_api.create_repo("alice/created")
    assert url.repo_id == "alice/created" and url == f"{hub_server.url}/alice/created"
    assert hf_api.create_repo("alice/created", exist_ok=True).repo_id == "alice/created"
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_repo("alice/created")
    assert err.value.response.status_code == 409
    # bob cannot create in alice's namespace; no namespace means the caller's own
    bob = HfApi(endpoint=hub_server.url, token=OTHER)
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/not-yours")
    assert err.value.response.status_code == 403
    assert bob.create_repo("mine").repo_id == "bob/mine"


def test_upload_folder_listing_and_info(hf_api, hub_server, repo_id, folder):
    info = hf_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first")
    expected = ["README.md", "config.json", "sub/weights.bin"]
    assert sorted(hf_api.list_repo_files(repo_id)) == expected
    model = hf_api.model_info(repo_id)
    assert model.sha == info.oid == hub_server.commit_sha(repo_id)
    assert sorted(s.rfilename for s in model.siblings) == expected
    assert hub_server.repo_files(repo_id)["sub/weights.bin"] == (folder / "sub" / "weights.bin").read_bytes()
    top = {entry.path for entry in hf_api.list_repo_tree(repo_id)}
    assert top == {"README.md", "config.json", "sub"}
    # Re-uploading unchanged files makes no commit (the client compares preupload oids).
    again = hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert again.oid == info.oid
    files = hf_api.get_paths_info(repo_id, ["config.json", "sub", "missing.txt"], expand=True)
    assert [f.path for f in files] == ["config.json", "sub"]
    assert files[0].size == len('{"r": 4}') and files[0].last_commit.oid == info.oid


def test_download_cache_and_pinned_revision(hf_api, hub_server, repo_id, folder, hf_cache):
    first = hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    path = _download(hub_server, repo_id, "sub/weights.bin")
    assert Path(path).read_bytes() == (folder / "sub" / "weights.bin").read_bytes()
    assert Path(path).is_relative_to(hf_cache)

    gets = lambda: sum(r.method == "GET" and "/resolve/" in r.path for r in hub_server.requests)  # noqa: E731
    before = gets()
    assert _download(hub_server, repo_id, "sub/weights.bin") == path  # HEAD only, body from cache
    assert gets() == before

    hf_api.upload_file(path_or_fileobj=b'{"r": 8}', path_in_repo="config.json", repo_id=repo_id)
    assert Path(_download(hub_server, repo_id, "config.json")).read_text() == '{"r": 8}'
    old = _download(hub_server, repo_id, "config.json", revision=first.oid)
    assert Path(old).read_text() == '{"r": 4}'


def test_snapshot_download(hf_api, hub_server, repo_id, folder, hf_cache):
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    snap = Path(snapshot_download(repo_id, endpoint=hub_server.url, token=TOKEN))
    got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    assert got == hub_server.repo_files(repo_id)


def test_file_and_repo_exists(hf_api, repo_id, folder):
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert hf_api.file_exists(repo_id, "sub/weights.bin")
    assert not hf_api.file_exists(repo_id, "nope.txt")
    assert hf_api.repo_exists(repo_id)
    assert not hf_api.repo_exists("alice/never-created")


def test_private_repo_visible_to_owner_only(hf_api, hub_server, folder, hf_cache):
    hf_api.create_repo("alice/secret", private=True)
    hf_api.upload_folder(repo_id="alice/secret", folder_path=folder)
    assert hf_api.model_info("alice/secret").private is True
    assert Path(_download(hub_server, "alice/secret", "config.json")).read_text() == '{"r": 4}'
    for token in (OTHER, False):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub_server.url, token=token).model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            _download(hub_server, "alice/secret", "README.md", token=token)
    assert not HfApi(endpoint=hub_server.url, token=OTHER).repo_exists("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=OTHER).upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/secret")


def test_public_repo_is_read_only_for_others(hub_server, repo_id, hf_cache):
    bob = HfApi(endpoint=hub_server.url, token=OTHER)
    assert bob.model_info(repo_id).id == repo_id
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403


def test_missing_revision_and_entry(hf_api, hub_server, repo_id, folder, hf_cache):
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    with pytest.raises(RevisionNotFoundError):
        _download(hub_server, repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        _download(hub_server, repo_id, "no-such-file.txt")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub_server, "alice/never-created", "config.json")


def test_create_pr_leaves_main_unchanged(hf_api, hub_server, repo_id, folder, hf_cache):
    base = hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    pr = hf_api.upload_file(path_or_fileobj=b"changed", path_in_repo="config.json", repo_id=repo_id,
                            create_pr=True)
    assert pr.pr_url == f"{hub_server.url}/{repo_id}/discussions/1"
    assert pr.pr_revision == "refs/pr/1"
    assert hub_server.commit_sha(repo_id) == base.oid
    assert hub_server.repo_files(repo_id)["config.json"] == b'{"r": 4}'
    assert hub_server.repo_files(repo_id, "refs/pr/1")["config.json"] == b"changed"
    assert Path(_download(hub_server, repo_id, "config.json", revision="refs/pr/1")).read_bytes() == b"changed"
    assert hf_api.model_info(repo_id, revision="refs/pr/1").sha == pr.oid


def test_branches_and_deletions(hf_api, hub_server, repo_id, folder):
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    hf_api.create_branch(repo_id, branch="dev")
    hf_api.delete_folder("sub", repo_id=repo_id, revision="dev")
    hf_api.delete_file("README.md", repo_id=repo_id, revision="dev")
    assert hf_api.list_repo_files(repo_id, revision="dev") == ["config.json"]
    assert len(hf_api.list_repo_files(repo_id)) == 3
    with pytest.raises(EntryNotFoundError):
        hf_api.delete_file("README.md", repo_id=repo_id, revision="dev")


def test_delete_repo(hf_api):
    hf_api.create_repo("alice/doomed")
    hf_api.delete_repo("alice/doomed")
    assert not hf_api.repo_exists("alice/doomed")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.delete_repo("alice/doomed")
    hf_api.delete_repo("alice/doomed", missing_ok=True)


def test_failed_commit_is_all_or_nothing(hf_api, hub_server, repo_id, folder):
    first = hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    before = hub_server.repo_files(repo_id)
    (folder / "config.json").write_text('{"r": 16}')
    (folder / "new.txt").write_text("new")
    hub_server.fail_next_commits(1)
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert err.value.response.status_code == 500
    assert hub_server.commit_sha(repo_id) == first.oid
    assert hub_server.repo_files(repo_id) == before
    retry = hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert retry.oid != first.oid
    files = hub_server.repo_files(repo_id)
    assert files["config.json"] == b'{"r": 16}' and files["new.txt"] == b"new"


def test_truncated_download_is_retried_and_cache_stays_clean(hf_api, hub_server, repo_id, folder, hf_cache):
    """Observed client behaviour: httpx raises RemoteProtocolError on the short body, `http_get`
    waits 1 s and issues a new GET (with `Range` only for bytes it already wrote, i.e. none for
    files under its 10 MB read chunk), and the download succeeds."""
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    expected = (folder / "sub" / "weights.bin").read_bytes()
    hub_server.truncate_next_downloads(1)
    path = Path(_download(hub_server, repo_id, "sub/weights.bin"))
    assert path.read_bytes() == expected
    url_path = f"/{repo_id}/resolve/main/sub/weights.bin"
    resolve_gets = [r for r in hub_server.requests if (r.method, r.path) == ("GET", url_path)]
    assert len(resolve_gets) == 2
    assert not list(hf_cache.rglob("*.incomplete"))
    # A later forced download returns the very same bytes.
    again = Path(_download(hub_server, repo_id, "sub/weights.bin", force_download=True))
    assert again.read_bytes() == expected


def test_range_requests(hf_api, hub_server, repo_id):
    hf_api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)
    url = f"{hub_server.url}/{repo_id}/resolve/main/digits.txt"
    request = urllib.request.Request(url, headers={"Range": "bytes=4-"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == "bytes 4-9/10"
        assert response.read() == b"456789"
        assert response.headers["X-Repo-Commit"] == hub_server.commit_sha(repo_id)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=20-"}))
    assert err.value.code == 416


def test_unknown_route_is_json_404(hub_server):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{hub_server.url}/api/no-such-route")
    assert err.value.code == 404
    assert b'"error"' in err.value.read()


def test_request_log_never_contains_tokens(hf_api, hub_server, repo_id):
    hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    log = hub_server.requests
    assert ("POST", f"/api/models/{repo_id}/commit/main", 200) in log
    assert not any(token in str(record) for record in log for token in (TOKEN, OTHER, "Bearer"))
