"""server/report.code_commit reads the commit a result records from a plain checkout and from
a git worktree (whose ``.git`` is a file naming its git dir), without running git."""

import shutil
import subprocess

import pytest

from metamoe.server.report import code_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git to set up")


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_commit_of_a_checkout_and_of_a_worktree(tmp_path, monkeypatch):
    monkeypatch.delenv("METAMOE_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("a")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = _git(repo, "rev-parse", "HEAD")
    assert code_commit(repo) == head
    _git(repo, "worktree", "add", "-q", "-b", "dev", str(tmp_path / "wt"))
    (tmp_path / "wt" / "b.txt").write_text("b")
    _git(tmp_path / "wt", "add", "b.txt")
    _git(tmp_path / "wt", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b")
    dev = _git(tmp_path / "wt", "rev-parse", "HEAD")
    assert dev != head and code_commit(tmp_path / "wt") == dev
    _git(repo, "pack-refs", "--all")  # refs only in packed-refs: still found
    assert code_commit(tmp_path / "wt") == dev and code_commit(repo) == head
    assert code_commit(tmp_path / "nothing") == "unknown"
    monkeypatch.setenv("METAMOE_COMMIT", "abc")
    assert code_commit(repo) == "abc"
