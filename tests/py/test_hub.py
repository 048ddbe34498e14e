"""Hub ids: tessera downloads a model from a (local, fake) hub into the standard Hugging Face
cache layout, resumes cut transfers, verifies sizes, honours HF_TOKEN, HF_HUB_OFFLINE and
--revision."""
import os
import pathlib
import subprocess

import pytest

from fake_hub import FakeHub

REPO = "tiny-org/stories260K"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json")


@pytest.fixture(scope="module")
def model_files(shared):
    src = shared / "models" / "stories260K-hf"
    return {name: (src / name).read_bytes() for name in FILES}


def run(tessera, args, env_extra, home):
    env = dict(os.environ)
    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
        env.pop(k, None)
    env["HF_HOME"] = str(home)
    env.update(env_extra)
    return subprocess.run([tessera] + args, capture_output=True, text=True, env=env, timeout=60)


def tokenize(tessera, model, env, home, extra=()):
    return run(tessera, ["tokenize", model, "--text", "Once upon a time"] + list(extra), env, home)


def expected_ids(tessera, shared):
    r = subprocess.run([tessera, "tokenize", str(shared / "models" / "stories260K-hf"), "--text",
                        "Once upon a time"], capture_output=True, text=True, check=True)
    return r.stdout


def repo_dir(home):
    return pathlib.Path(home) / "hub" / "models--tiny-org--stories260K"


def test_download_into_standard_cache_layout(tessera, shared, model_files, tmp_path):
    with FakeHub({REPO: {"main": model_files}}) as hub:
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_ids(tessera, shared)
    d = repo_dir(tmp_path)
    commit = FakeHub.commit_of(REPO, "main")
    assert (d / "refs" / "main").read_text() == commit
    for name in FILES:
        link = d / "snapshots" / commit / name
        assert link.is_symlink(), name
        assert os.readlink(link).startswith("../../blobs/")
        assert link.read_bytes() == model_files[name]
    assert not list((d / "blobs").glob("*.incomplete"))


def test_offline_uses_cache_and_fails_clearly_without_it(tessera, shared, model_files, tmp_path):
    r = tokenize(tessera, REPO, {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert r.returncode != 0
    assert "HF_HUB_OFFLINE" in r.stderr and REPO in r.stderr
    with FakeHub({REPO: {"main": model_files}}) as hub:
        assert tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path).returncode == 0
        n_requests = len(hub.requests)
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "1"}, tmp_path)
        assert len(hub.requests) == n_requests  # offline: not one request
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_ids(tessera, shared)


def test_cut_transfer_resumes(tessera, shared, model_files, tmp_path):
    size = len(model_files["model.safetensors"])
    with FakeHub({REPO: {"main": model_files}}) as hub:
        hub.cut_once["model.safetensors"] = size // 3
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path)
        assert r.returncode != 0
        assert "model.safetensors" in r.stderr and "resume" in r.stderr
        partial = list((repo_dir(tmp_path) / "blobs").glob("*.incomplete"))
        assert len(partial) == 1 and partial[0].stat().st_size == size // 3
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path)
        assert r.returncode == 0, r.stderr
        ranges = [rng for path, rng in hub.requests if path.endswith("/model.safetensors")]
    assert ranges[-1] == "bytes=%d-" % (size // 3)
    commit = FakeHub.commit_of(REPO, "main")
    got = (repo_dir(tmp_path) / "snapshots" / commit / "model.safetensors").read_bytes()
    assert got == model_files["model.safetensors"]


def test_size_mismatch_is_an_error(tessera, model_files, tmp_path):
    with FakeHub({REPO: {"main": model_files}}) as hub:
        hub.lie_size["tokenizer.json"] = len(model_files["tokenizer.json"]) + 10
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path)
    assert r.returncode != 0
    assert "tokenizer.json" in r.stderr and "the hub says" in r.stderr


def test_token_is_sent_and_required(tessera, shared, model_files, tmp_path):
    with FakeHub({REPO: {"main": model_files}}, token="hf_secret") as hub:
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint}, tmp_path)
        assert r.returncode != 0 and "HF_TOKEN" in r.stderr
        r = tokenize(tessera, REPO, {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_secret"},
                     tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_ids(tessera, shared)


def test_revision_and_unknown_repo(tessera, model_files, tmp_path):
    other = dict(model_files)
    other["tokenizer_config.json"] = model_files["tokenizer_config.json"].replace(
        b'"add_bos_token": true', b'"add_bos_token": false')
    with FakeHub({REPO: {"main": model_files, "v1": other}}) as hub:
        env = {"HF_ENDPOINT": hub.endpoint}
        main_ids = tokenize(tessera, REPO, env, tmp_path).stdout
        r = tokenize(tessera, REPO, env, tmp_path, ["--revision", "v1"])
        assert r.returncode == 0, r.stderr
        assert r.stdout != main_ids  # v1's config adds no BOS
        assert (repo_dir(tmp_path) / "refs" / "v1").read_text() == FakeHub.commit_of(REPO, "v1")
        r = tokenize(tessera, "tiny-org/missing", env, tmp_path)
    assert r.returncode != 0
    assert "tiny-org/missing" in r.stderr and "not found" in r.stderr


def test_unreachable_hub_falls_back_to_cache(tessera, shared, model_files, tmp_path):
    with FakeHub({REPO: {"main": model_files}}) as hub:
        endpoint = hub.endpoint
        assert tokenize(tessera, REPO, {"HF_ENDPOINT": endpoint}, tmp_path).returncode == 0
    r = tokenize(tessera, REPO, {"HF_ENDPOINT": endpoint}, tmp_path)  # server is gone
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_ids(tessera, shared)
    r = tokenize(tessera, "tiny-org/other", {"HF_ENDPOINT": endpoint}, tmp_path)
    assert r.returncode != 0 and "cannot reach" in r.stderr
