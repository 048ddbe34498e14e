"""Shared fixtures for the black-box tests: paths of the binary, the source tree and shared data."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tessera():
    exe = ROOT / os.environ.get("TESSERA_BUILD", "build") / "tessera"
    assert exe.exists(), "build/tessera is missing: run scripts/setup.sh"
    return str(exe)


@pytest.fixture(scope="session")
def shared():
    return pathlib.Path(os.environ.get("TESSERA_SHARED", ROOT.parent / "shared")).resolve()


TINY_PRESETS = ("tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama-tied")


@pytest.fixture(scope="session")
def checkpoints(shared):
    """The tiny test checkpoints of tools/gen_checkpoint.py, built once and cached under
    build/checkpoints/<generator hash>/: {preset: {"hf": dir (f32 safetensors), "gguf": file (f32),
    "golden": tests/golden/<preset>.json}}. The cache key is the generator's source, so a changed
    generator rebuilds; the HF weights must hash to the golden file's safetensors_sha256."""
    import hashlib
    import json
    import shutil
    import subprocess
    import sys

    gen = ROOT / "tools" / "gen_checkpoint.py"
    key = hashlib.sha256(gen.read_bytes()).hexdigest()[:12]
    cache = ROOT / "build" / "checkpoints" / key
    for old in cache.parent.glob("*"):  # checkpoints of earlier generator versions
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    out = {}
    for preset in TINY_PRESETS:
        hf, gg = cache / preset, cache / f"{preset}.gguf"
        if not (hf / "model.safetensors").exists() or not gg.exists():
            tmp = cache / f".tmp-{preset}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run([sys.executable, str(gen), preset, str(tmp / preset), "--gguf",
                            str(tmp / f"{preset}.gguf"), "--tokenizers",
                            str(shared / "tokenizers")], check=True)
            shutil.rmtree(hf, ignore_errors=True)
            (tmp / f"{preset}.gguf").replace(gg)
            (tmp / preset).replace(hf)
            shutil.rmtree(tmp, ignore_errors=True)
        golden = ROOT / "tests" / "golden" / f"{preset}.json"
        out[preset] = {"hf": hf, "gguf": gg, "golden": golden}
    return out
