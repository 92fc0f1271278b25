"""Progress output: one row per layer under its diffID, frozen once finished, fitted to the terminal.

The unit tests draw into a pseudo-terminal whose size the kernel reports (os.openpty + TIOCSWINSZ)
and replay what was written on a small terminal model; the integration tests run a real
`dogestry push` against the suite's dockerd, piped and inside tmux.
"""

import fcntl
import io
import os
import re
import shlex
import struct
import subprocess
import sys
import termios

import pytest

import dogestry
from realdocker import DOGESTRY, build_image, image_layers, random_bytes, run_dogestry, text_bytes

ESCAPE = re.compile(r"\x1b\[(\d*)([AJK])")


class Screen:
    """A terminal as Progress sees it: a pty (its size is what the kernel reports for its fd)
    and a model of what it shows: text wraps after the last column, "\\n" starts the next line,
    ESC[nA moves up, ESC[2K erases the line, ESC[J erases below the cursor."""

    def __init__(self, columns, lines=30):
        self.master, self.slave = os.openpty()
        self.lines, self.row, self.col = [""], 0, 0
        self.resize(columns, lines)

    def resize(self, columns, lines=30):
        """Change the size the kernel reports (what a window resize does; lines are not reflowed)."""
        self.columns = columns
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))

    def fileno(self):
        return self.slave

    def isatty(self):
        return True

    def flush(self):
        pass

    def close(self):
        os.close(self.master)
        os.close(self.slave)

    def write(self, text):
        pos = 0
        for m in ESCAPE.finditer(text):
            self._text(text[pos:m.start()])
            self._escape(int(m.group(1) or 1), m.group(2))
            pos = m.end()
        self._text(text[pos:])

    def _escape(self, n, kind):
        if kind == "A":
            self.row, self.col = max(self.row - n, 0), min(self.col, self.columns - 1)
        elif kind == "K":
            self.lines[self.row] = ""
        else:
            self.lines[self.row] = self.lines[self.row][:self.col]
            del self.lines[self.row + 1:]

    def _text(self, text):
        for ch in text:
            if ch == "\n":
                self._move_to(self.row + 1, 0)
                continue
            if self.col >= self.columns:  # the pending wrap of the last column
                self._move_to(self.row + 1, 0)
            line = self.lines[self.row].ljust(self.col)
            self.lines[self.row] = line[:self.col] + ch + line[self.col + 1:]
            self.col += 1

    def _move_to(self, row, col):
        while len(self.lines) <= row:
            self.lines.append("")
        self.row, self.col = row, col

    def shown(self):
        """The non-empty lines on the screen, top to bottom."""
        return [line.rstrip() for line in self.lines if line.strip()]


@pytest.fixture
def screen_of():
    """Factory: screen_of(columns) -> a Screen; closed after the test."""
    screens = []

    def make(columns):
        screens.append(Screen(columns))
        return screens[-1]

    yield make
    for screen in screens:
        screen.close()


class Clock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def rows_with(lines, label):
    """The lines naming label."""
    return [line for line in lines if label in line]


def test_a_finished_row_keeps_its_status_and_rate_while_other_rows_move_on(screen_of):
    """Once a row says "pushed", later redraws show it unchanged: its rate is frozen at the finish."""
    screen, clock = screen_of(120), Clock()
    progress = dogestry.Progress(screen, tty=True, clock=clock)
    slow = progress.task("aaaaaaaaaaaa", "uploading", 100000000)
    fast = progress.task("bbbbbbbbbbbb", "uploading", 40000000)
    clock.now += 1.0
    fast.advance(40000000)
    fast.finish("pushed")
    finished = rows_with(screen.shown(), "bbbbbbbbbbbb")
    for _ in range(10):
        clock.now += 5.0
        fast.advance(1000)
        slow.advance(1000000)
    assert finished == ["bbbbbbbbbbbb: pushed 40.0MB in 1.0s (40.0MB/s)"]
    assert rows_with(screen.shown(), "bbbbbbbbbbbb") == finished
    assert "10.0MB/100.0MB" in rows_with(screen.shown(), "aaaaaaaaaaaa")[0]


@pytest.mark.parametrize("columns", [40, 60])
def test_rows_are_cut_to_the_terminal_width_so_redraws_never_repeat_them(screen_of, columns):
    """At any width each row takes one line: redrawing in place leaves every layer on exactly one line."""
    screen, clock = screen_of(columns), Clock()
    progress = dogestry.Progress(screen, tty=True, clock=clock)
    labels = ["%012x" % (0x879f267346b0 + i) for i in range(4)]
    tasks = [progress.task(label, "compressing", 80000000) for label in labels]
    for step in range(20):
        clock.now += 0.5
        for task in tasks:
            task.advance(4000000)
    tasks[0].finish("pushed")
    lines = screen.shown()
    assert max(len(line) for line in lines) < columns
    assert [len(rows_with(lines, label)) for label in labels] == [1, 1, 1, 1]
    assert len(lines) == 4


def test_rows_follow_a_resize_of_the_terminal(screen_of):
    """The width is read at every redraw: after the window narrows, rows are cut to the new width."""
    screen, clock = screen_of(120), Clock()
    progress = dogestry.Progress(screen, tty=True, clock=clock)
    labels = ["%012x" % (0xabc000000000 + i) for i in range(3)]
    tasks = [progress.task(label, "uploading", 50000000) for label in labels]
    clock.now += 1.0
    tasks[0].advance(1000000)
    wide = screen.shown()
    screen.resize(50)
    screen.lines = [line[:50] for line in screen.lines]  # what a terminal keeps of wider lines
    for _ in range(5):
        clock.now += 1.0
        for task in tasks:
            task.advance(1000000)
    narrow = screen.shown()
    assert max(len(line) for line in wide) > 50
    assert max(len(line) for line in narrow) < 50
    assert [len(rows_with(narrow, label)) for label in labels] == [1, 1, 1]


def test_a_row_is_renamed_in_place_once_its_layer_id_is_known(screen_of):
    """A layer read under a placeholder label keeps its row: the row takes the diffID, then uploads."""
    screen, clock = screen_of(100), Clock()
    progress = dogestry.Progress(screen, tty=True, clock=clock)
    row = progress.task("layer 1", "compressing", 80000000)
    clock.now += 2.0
    row.advance(80000000)
    row.phase("read", None, "80.0MB -> 40.9MB gzip")
    row.rename("879f267346b0")
    row.phase("uploading", 40900000)
    clock.now += 1.0
    row.advance(40900000)
    row.finish("pushed")
    assert screen.shown() == ["879f267346b0: pushed 80.0MB -> 40.9MB gzip in 1.0s (40.9MB/s)"]


def test_plain_output_is_one_line_per_row_when_it_finishes():
    """Without a terminal nothing is redrawn: a row's steps print nothing, its finish one line."""
    stream, clock = io.StringIO(), Clock()
    progress = dogestry.Progress(stream, tty=False, clock=clock)
    row = progress.task("layer 1", "compressing", 80000000)
    row.advance(80000000)
    row.phase("read", None, "80.0MB -> 40.9MB gzip")
    row.rename("879f267346b0")
    row.phase("waiting", None)
    clock.now += 5.0
    row.phase("uploading", 40900000)
    clock.now += 2.0
    row.advance(40900000)
    row.finish("pushed")
    stored = progress.task("layer 2", "reading", 1000)
    stored.advance(1000)
    stored.rename("0123456789ab")
    stored.phase("already stored", None, "")
    stored.finish("already stored")
    assert stream.getvalue().splitlines() == ["879f267346b0: pushed 80.0MB -> 40.9MB gzip in 2.0s (20.4MB/s)",
                                              "0123456789ab: already stored"]


# --- a real push ---


@pytest.fixture(scope="module")
def two_layer_image(docker_host):
    """An image of an incompressible layer and a compressible one, large enough for many redraws."""
    layers = [{"data/random.bin": random_bytes(24 << 20, 7)}, {"data/words.txt": text_bytes(24 << 20, 8)}]
    build_image(docker_host, "dgtest/progress:1", layers)
    return [d[7:19] for d in image_layers(docker_host, "dgtest/progress:1")]


HEX_LABEL = re.compile(r"^([0-9a-f]{12}): ")


@pytest.mark.integration
def test_a_piped_push_names_each_layer_once_by_its_diffid(docker_env, docker_host, two_layer_image, tmp_path):
    """Without a terminal a push says it waits for docker save, then prints one line per layer,
    under the diffID docker inspect shows: what it sent, and a layer the store has as "already stored"."""
    store = tmp_path / "store"
    first = run_dogestry("push", store, "dgtest/progress:1", env=docker_env)
    layers = [{"data/random.bin": random_bytes(24 << 20, 7)}, {"etc/other.conf": b"other\n"}]
    build_image(docker_host, "dgtest/progress:2", layers)
    shared, added = [d[7:19] for d in image_layers(docker_host, "dgtest/progress:2")]
    second = run_dogestry("push", store, "dgtest/progress:2", env=docker_env)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    lines = first.stderr.splitlines()
    labelled = [m.group(1) for m in map(HEX_LABEL.match, lines) if m]
    assert sorted(labelled) == sorted(two_layer_image)
    assert "waiting for the Docker engine to export image" in lines[0]
    # a layer of 16 MiB or more is stored as chunks: the row says how many, how many were new, their bytes
    assert re.search(r"^%s: pushed 25\.2MB as \d+ chunks, \d+ new \(\S+ written\) in [\d.]+s \(\S+/s\)$" % two_layer_image[1],
                     first.stderr, re.M)
    rows = [line for line in second.stderr.splitlines() if HEX_LABEL.match(line)]
    assert rows_with(rows, shared) == ["%s: already stored" % shared]
    assert len(rows_with(rows, added)) == 1
    assert rows_with(rows, added)[0].startswith("%s: pushed " % added)


def run_in_tmux(tmp_path, columns, command, env):
    """Run command in a detached tmux window of columns x 30 on its own server; return the
    screen (capture-pane -p) once the command ended, and its exit status."""
    script = tmp_path / "run.sh"
    exports = "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in env.items() if re.match(r"^\w+$", k))
    sock = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock, "-f", "/dev/null"]
    script.write_text(exports + "%s\necho EXIT=$?\n%s wait-for -S ended\nexec sleep 600\n"
                      % (" ".join(map(shlex.quote, command)), " ".join(map(shlex.quote, tmux))))
    subprocess.run(tmux + ["new-session", "-d", "-x", str(columns), "-y", "30", "sh", str(script)], check=True)
    try:
        subprocess.run(tmux + ["wait-for", "ended"], check=True, timeout=300)  # signalled once it ended
        screen = subprocess.run(tmux + ["capture-pane", "-p"], check=True, stdout=subprocess.PIPE,
                                universal_newlines=True).stdout
    finally:
        subprocess.run(tmux + ["kill-server"], check=False)
    status = re.search(r"^EXIT=(\d+)$", screen, re.M)
    assert status, screen
    return screen, int(status.group(1))


@pytest.mark.integration
@pytest.mark.parametrize("columns", [60, 120])
def test_a_push_in_a_terminal_shows_each_layer_on_one_row_that_fits(docker_env, two_layer_image, tmp_path, columns):
    """In a real terminal (tmux) each layer ends on exactly one row, under its diffID, no row is
    wider than the window and none is repeated by the in-place redraws."""
    command = [sys.executable, str(DOGESTRY), "push", str(tmp_path / "store"), "dgtest/progress:1"]
    screen, status = run_in_tmux(tmp_path, columns, command, docker_env)
    lines = [line for line in screen.splitlines() if line.strip()]
    assert status == 0, screen
    assert max(len(line) for line in lines) <= columns
    assert len(set(lines)) == len(lines), screen
    assert [len(rows_with(lines, layer)) for layer in two_layer_image] == [1, 1], screen
    assert sorted(m.group(1) for m in map(HEX_LABEL.match, lines) if m) == sorted(two_layer_image), screen
    assert all("pushed" in rows_with(lines, layer)[0] for layer in two_layer_image), screen
