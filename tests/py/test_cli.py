"""The executable's top-level behaviour."""
import subprocess


def test_help_lists_commands(tessera):
    out = subprocess.run([tessera, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("serve", "generate", "tokenize", "bench", "worker"):
        assert cmd in out


def test_unknown_command_fails(tessera):
    r = subprocess.run([tessera, "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr
