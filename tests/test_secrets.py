"""Tokens never reach an output or a file: every CLI call of the tests runs with a fake HF_TOKEN."""

from __future__ import annotations

from conftest import CLI_OUTPUTS, FAKE_TOKEN, cli, cli_here


def test_no_output_or_file_holds_the_token(two_step_run, tmp_path_factory, tmp_path):
    recipe = two_step_run.parent / "recipe.toml"
    cli_here("plan", str(recipe))
    cli_here("report", str(two_step_run))
    cli("export", str(two_step_run), "--what", "adapter", "--output", str(tmp_path / "adapter"))
    cli("merge", str(two_step_run / "step-1" / "model"), str(two_step_run / "step-2" / "adapter"), "--output", str(tmp_path / "merged"))
    assert len(CLI_OUTPUTS) >= 8  # this test's commands and the session's run, at least
    for text in CLI_OUTPUTS:
        assert FAKE_TOKEN not in text
    scanned = 0
    for p in tmp_path_factory.getbasetemp().rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert FAKE_TOKEN.encode() not in p.read_bytes(), p
            scanned += 1
    assert scanned > 20
