"""The `align` command, strict configs, and bad input: one line, exit status 2, no partial output."""

import os
import subprocess
import sys

import pytest

from alignment.cli import STAGES


def align(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_every_stage():
    proc = align("--help")
    assert proc.returncode == 0
    for stage in STAGES:
        assert f"  {stage} " in proc.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_help_exits_0_and_names_the_command(stage, capsys):
    """`align <stage> --help` prints the stage's usage (naming `align <stage>`, not the module file) and exits 0."""
    from alignment.cli import main

    try:
        main([stage, "--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    assert f"usage: align {stage}" in out, out[:300]


def test_unknown_stage():
    assert_user_error(align("tokeniser"), "unknown stage 'tokeniser'", "did you mean 'tokenizer'")


def test_unknown_key_in_yaml_names_closest(tmp_path, corpus_file):
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(f"# align tokenizer --config {cfg}\nfiles: [{corpus_file}]\nvocab_sise: 300\noutput_dir: {tmp_path / 'out'}\n")
    assert_user_error(align("tokenizer", "--config", cfg), "config file", "unknown key 'vocab_sise'", "did you mean 'vocab_size'")
    assert not (tmp_path / "out").exists()


def test_unknown_key_on_command_line(tmp_path, corpus_file):
    proc = align("tokenizer", "--files", corpus_file, "--output_dir", tmp_path / "out", "--vocab_size", "300", "--min_freq", "3")
    assert_user_error(proc, "command line", "unknown key 'min_freq'", "did you mean 'min_frequency'")


def test_bad_value_type(tmp_path, corpus_file):
    assert_user_error(align("tokenizer", "--files", corpus_file, "--vocab_size", "many"), "vocab_size", "many")


def test_yaml_then_command_line_override_and_saved_config(tmp_path, corpus_file):
    import yaml

    cfg = tmp_path / "tok.yaml"
    cfg.write_text(f"files: [{corpus_file}]\nvocab_size: 300\noutput_dir: {tmp_path / 'out'}\nreference: none\n")
    proc = align("tokenizer", "--config", cfg, "--vocab_size", "320")
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["vocab_size"] == 320 and saved["reference"] == "none"
    # existing output directory: refused unless --overwrite, and left untouched
    before = sorted(os.listdir(tmp_path / "out"))
    assert_user_error(align("tokenizer", "--config", cfg), "output directory exists", "--overwrite")
    assert sorted(os.listdir(tmp_path / "out")) == before
    assert align("tokenizer", "--config", cfg, "--overwrite", "true").returncode == 0


def test_python_dash_m_entry_point(tmp_path, corpus_file):
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "--files", str(corpus_file), "--vocab_size", "300",
                           "--output_dir", str(tmp_path / "t"), "--reference", "none"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t" / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", ["missing", "empty", "undecodable", "small_vocab", "no_corpus"])
def test_tokenizer_bad_input(tmp_path, case):
    out = tmp_path / "out"
    f = tmp_path / "c.txt"
    args = ["--output_dir", out, "--vocab_size", "300"]
    if case == "missing":
        proc, expect = align("tokenizer", "--files", tmp_path / "nope.txt", *args), ["nope.txt", "no such file"]
    elif case == "empty":
        f.write_text("  \n\n")
        proc, expect = align("tokenizer", "--files", f, *args), ["c.txt", "empty"]
    elif case == "undecodable":
        f.write_bytes(b"good text\nbad \xff\xfe bytes\n")
        proc, expect = align("tokenizer", "--files", f, *args), ["c.txt", "line 2: undecodable bytes at byte 14", "UTF-8"]
    elif case == "small_vocab":
        f.write_text("some text")
        proc, expect = align("tokenizer", "--files", f, "--output_dir", out, "--vocab_size", "100"), ["vocab_size", "at least 256 bytes + 20 special tokens = 276"]
    else:
        proc, expect = align("tokenizer", *args), ["files", "no corpus"]
    assert_user_error(proc, *expect)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_export_bad_input(tmp_path, tiny_tokenizer_dir):
    assert_user_error(align("export", "--tokenizer", tmp_path, "--output_dir", tmp_path / "m"), "no tokenizer.json")
    assert_user_error(align("export", "--tokenizer", tiny_tokenizer_dir, "--preset", "huge", "--output_dir", tmp_path / "m"), "unknown model preset 'huge'")
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"\x80\x02 truncated")
    assert_user_error(align("export", "--tokenizer", tiny_tokenizer_dir, "--checkpoint", bad, "--output_dir", tmp_path / "m"), "ckpt.pt", "corrupted or truncated")
    assert not (tmp_path / "m").exists()
