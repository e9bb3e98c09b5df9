"""Test helpers for the user-facing features: a local Hugging Face cache built from a folder, a small word-level
tokenizer (optionally with a chat template), and running the CLI in a pseudo-terminal."""
from __future__ import annotations

import hashlib
import os
import shutil

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(folder: str, words: int = 200, chat_template: bool = True):
    """A WordLevel tokenizer over w0..w{words-1} plus role markers, saved into `folder`; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", "[PAD]", "<|user|>", "<|assistant|>", "<|system|>", *[f"w{i}" for i in range(words)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_hub_cache(cache_dir: str, repo_id: str, src: str, commit: str = "c0ffee" * 6 + "beef",
                   ref: str = "main") -> str:
    """Lay `src` out as huggingface_hub's cache does (blobs named by content hash, snapshot files as relative
    links to them, refs/<ref> holding the commit); returns the snapshot folder."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for dirpath, _, files in os.walk(src):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, src)
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            blob = os.path.join(repo, "blobs", digest)
            if not os.path.exists(blob):
                shutil.copyfile(full, blob)
            link = os.path.join(snap, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo, "refs", ref), "w") as f:
        f.write(commit)
    return snap


def run_in_pty(args, env=None, timeout=240, cols=160, interrupt_on: str | None = None) -> tuple[int, str]:
    """Run `python -m dist_export ARGS` with stdin/stdout/stderr on a pseudo-terminal; (exit code, all output).

    `interrupt_on`: once the output holds this text, SIGINT goes to the job's whole process group, as the
    terminal sends it on Ctrl-C (the command runs in a session of its own)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "dist_export", *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, **(env or {})}, cwd=repo, close_fds=True,
                            start_new_session=interrupt_on is not None)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"dist-export {' '.join(args)} produced no output for {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if interrupt_on is not None and interrupt_on in b"".join(chunks).decode(errors="replace"):
                import signal

                os.killpg(proc.pid, signal.SIGINT)
                interrupt_on = None
    finally:
        os.close(master)
        proc.wait(timeout=60)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def screen_lines(text: str) -> list[str]:
    """What a terminal shows after `text`: carriage returns, newlines, erase-line (ESC[K, ESC[2K) and cursor-up
    (ESC[nA) applied, other escape sequences dropped; the lines, right-stripped (no wrapping: lines are kept whole)."""
    import re

    lines, row, col, i = [""], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\x1b":
            m = re.match(r"\x1b\[(\??[\d;]*)([A-Za-z])", text[i:])
            if m:
                arg, cmd = m.groups()
                if cmd == "K":
                    lines[row] = "" if arg == "2" else lines[row][:col]
                elif cmd == "A":
                    row = max(0, row - int(arg or 1))
                i += len(m.group(0))
                continue
        if c == "\r":
            col = 0
        elif c == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif c >= " ":
            line = lines[row].ljust(col)
            lines[row] = line[:col] + c + line[col + 1:]
            col += 1
        i += 1
    return [ln.rstrip() for ln in lines]
