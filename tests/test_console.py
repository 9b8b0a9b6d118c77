"""What a user sees: on a terminal, log lines never share a line with the progress bar; in a file
(CI, `2> log`), one line per event and no carriage returns."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from conftest import ROOT, ner_recipe


def _visible_lines(raw: str) -> list[str]:
    """What a terminal shows of each line: a carriage return moves back to column 0 and later text
    overwrites (tqdm clears its bar with spaces before a log line)."""
    shown = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        col = 0
        for ch in line:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        shown.append("".join(cells).rstrip())
    return shown


def _recipe(tmp_path, tiny_bert, wnut_small) -> str:
    recipe = ner_recipe(tiny_bert, wnut_small, tmp_path / "run", {"name": "lora", "r": 2}, batch_size=2,
                        log_every=2, num_threads=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_log_lines_never_share_a_line_with_the_progress_bar(tmp_path, tiny_bert, wnut_small):
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", _recipe(tmp_path, tiny_bert, wnut_small)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert "train:" in raw and "\r" in raw  # a bar was drawn and redrawn on the terminal
    assert "eval:" in raw  # the validation pass shows its own progress
    shown = _visible_lines(raw)
    logs = [ln for ln in shown if "[peftlab]" in ln]
    assert any("eval" in ln for ln in logs) and any("schedule" in ln for ln in logs)  # logged while the bar ran
    assert not [ln for ln in logs if "train:" in ln or "it/s" in ln or not ln.startswith("[peftlab]")], logs


def test_a_log_file_gets_one_line_per_event(tmp_path, tiny_bert, wnut_small):
    log = tmp_path / "train.err"
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", _recipe(tmp_path, tiny_bert, wnut_small)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh).returncode
    assert rc == 0
    text = log.read_text()
    assert "\r" not in text and "%|" not in text
    lines = text.splitlines()
    assert lines and all(ln.startswith("[peftlab] ") for ln in lines), lines[:5]
    assert any("step 4/" in ln for ln in lines) and any(ln.startswith("[peftlab] done:") for ln in lines)


def test_evaluation_time_is_left_out_of_the_training_rate():
    import io
    import time

    from tqdm import tqdm

    from peftlab.training.progress import ProgressBar

    bar = ProgressBar()
    bar.bar = tqdm(total=10, file=io.StringIO())
    bar.update()
    start = bar.bar.start_t
    with bar.evaluating([1, 2, 3], "eval") as batches:
        assert list(batches) == [1, 2, 3]
        time.sleep(0.3)
    assert bar.bar.start_t - start >= 0.25  # the training bar's clock skipped the evaluation
    bar.close()
