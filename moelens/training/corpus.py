"""Build the multi-domain training corpus of ``moelens-tiny`` from text already on the machine.

Seven domains, each a few MB of deduplicated documents (one document = one source file, one
rendered man page or one generated block of arithmetic):

- ``python``: the running interpreter's standard library ``.py`` files (no tests, no site-packages);
- ``c``: C headers under ``/usr/include`` (no C++ trees), capped per top-level entry;
- ``en``, ``de``, ``fr``, ``es``: man pages rendered to plain text with ``man -l FILE | col -bx``,
  header and footer lines and translator-credit sections removed; the non-English pages come
  from Debian's ``manpages-{de,fr,es}`` (+ ``-dev``), installed with apt when missing;
- ``arith``: seeded generated equations such as ``123 + 456 = 579``.

Layout of ``out_dir``::

    manifest.json                   sources, commands, document and byte counts, seed
    train/<domain>.jsonl            {"text": ...} one document a line
    heldout/<domain>.jsonl          ~5% of each domain's documents, for evaluation only

The corpus belongs to the authors of its sources: it lives outside the repository and is never
committed; only this script is.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

DOMAINS = ("python", "c", "en", "de", "fr", "es", "arith")
HELDOUT_FRACTION = 0.05
DEBIAN_MAN_PACKAGES = tuple(f"manpages-{lang}{dev}" for lang in ("de", "fr", "es") for dev in ("", "-dev"))

# Bytes of text kept per domain. A few MB each is plenty for a ~6M-token training budget and
# keeps the corpus build (mostly man-page rendering) at a few minutes on 2 cores.
DOMAIN_BYTES = {"python": 3_000_000, "c": 3_000_000, "en": 3_000_000, "de": 3_000_000,
                "fr": 3_000_000, "es": 3_000_000, "arith": 1_500_000}
C_BYTES_PER_TOP_LEVEL = 250_000  # so that no single library (e.g. linux/, X11/) dominates "c"
MAX_DOCUMENT_BYTES = 60_000  # long files are truncated so that a few giants don't fill a domain

# Sections that credit translators or describe the packaging, not the command: removed.
_CREDIT_HEADINGS = {"ÜBERSETZUNG", "TRADUCTION", "TRADUCCIÓN", "COLOPHON", "KOLOPHON"}
_MAN_ENV = {"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""}
_MAN_COMMAND = "man --nh --nj -l FILE | col -bx"


def build_corpus(out_dir: Path, *, seed: int = 0, install_missing: bool = True) -> dict:
    """Build the corpus into ``out_dir`` (replacing a previous build) and return its manifest.

    Deterministic for a given ``seed`` and machine contents. With ``install_missing`` the Debian
    man-page packages are installed with apt when absent (needs root); otherwise a missing
    language raises ``RuntimeError``.
    """
    out_dir = Path(out_dir)
    if install_missing:
        _ensure_debian_man_pages()
    rng = random.Random(seed)
    collectors: dict[str, tuple[Callable[[random.Random], list[str]], dict]] = {
        "python": (_python_documents, {"source": sysconfig.get_paths()["stdlib"],
                                       "rule": "*.py, excluding test/tests/idle_test dirs and site-packages"}),
        "c": (_c_documents, {"source": "/usr/include", "rule": f"*.h, no C++ trees, "
                             f"<= {C_BYTES_PER_TOP_LEVEL} bytes per top-level entry"}),
        "arith": (_arith_documents, {"source": "generated", "rule": "a op b = c, op in + - * /, 1-4 digits"}),
    }
    for lang in ("en", "de", "fr", "es"):
        collectors[lang] = (_man_collector(lang), {
            "source": _man_root(lang), "command": _MAN_COMMAND, "env": _MAN_ENV,
            "rule": "header/footer lines and translator-credit/colophon sections removed"})

    for split in ("train", "heldout"):
        shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / split).mkdir(parents=True)
    manifest: dict = {"seed": seed, "heldout_fraction": HELDOUT_FRACTION, "domains": {}}
    for domain in DOMAINS:
        collect, info = collectors[domain]
        # Each domain draws from its own generator so that changing one domain's sources does not
        # reshuffle the others.
        docs = _dedupe(collect(random.Random(f"{seed}-{domain}")))
        docs = _cap_bytes(docs, DOMAIN_BYTES[domain])
        rng.shuffle(docs)
        n_heldout = max(1, round(HELDOUT_FRACTION * len(docs)))
        splits = {"heldout": docs[:n_heldout], "train": docs[n_heldout:]}
        for split, split_docs in splits.items():
            _write_jsonl(out_dir / split / f"{domain}.jsonl", split_docs)
        manifest["domains"][domain] = {
            **info,
            **{f"{split}_documents": len(d) for split, d in splits.items()},
            **{f"{split}_bytes": sum(len(t.encode()) for t in d) for split, d in splits.items()},
        }
        print(f"[corpus] {domain}: {manifest['domains'][domain]}", file=sys.stderr)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def read_split(corpus_dir: Path, split: str, domain: str) -> list[str]:
    """The documents of one domain and split (``"train"`` or ``"heldout"``) of a built corpus."""
    path = Path(corpus_dir) / split / f"{domain}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]


# --- sources -------------------------------------------------------------------------------------


def _python_documents(rng: random.Random) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    files = [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts[:-1])]
    rng.shuffle(files)
    return [t for t in (_read_text(p) for p in files) if t]


def _c_documents(rng: random.Random) -> list[str]:
    root = Path("/usr/include")
    by_top: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.h")):
        parts = path.relative_to(root).parts
        # C++ trees (c++/<version>, boost, ...); C++-only headers elsewhere are caught by content
        if any(p in ("c++", "boost") or p.endswith("++") for p in parts):
            continue
        by_top.setdefault(parts[0] if len(parts) > 1 else "<root>", []).append(path)
    docs: list[str] = []
    for top in sorted(by_top):
        files = by_top[top]
        rng.shuffle(files)
        texts = [t for t in (_read_text(p) for p in files) if t and not _looks_like_cpp(t)]
        # the root folder holds libc and friends: give it a larger share than one library
        docs += _cap_bytes(texts, C_BYTES_PER_TOP_LEVEL * (4 if top == "<root>" else 1))
    rng.shuffle(docs)
    return docs


def _looks_like_cpp(text: str) -> bool:
    return bool(re.search(r"^\s*(template\s*<|namespace\s+\w+\s*\{|class\s+\w+\s*[:{])", text, re.M))


def _arith_documents(rng: random.Random) -> list[str]:
    """Blocks of 20-40 equations; the operand sizes vary within a block."""
    docs = []
    for _ in range(3000):
        docs.append("\n".join(arith_equation(rng) for _ in range(rng.randint(20, 40))) + "\n")
    return docs


def arith_equation(rng: random.Random) -> str:
    """One true equation ``a op b = c`` with 1-4 digit operands (integer division for ``/``)."""
    op = rng.choice("+-*/")
    a, b = (rng.randint(0, 10 ** rng.randint(1, 4) - 1) for _ in range(2))
    if op == "/":
        b = max(b, 1)
    return f"{a} {op} {b} = {arith_answer(a, op, b)}"


def arith_answer(a: int, op: str, b: int) -> int:
    """The value of ``a op b`` as the corpus writes it (``/`` is floor division)."""
    if op == "/":
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _man_root(lang: str) -> str:
    return "/usr/share/man" if lang == "en" else f"/usr/share/man/{lang}"


def _man_collector(lang: str) -> Callable[[random.Random], list[str]]:
    def collect(rng: random.Random) -> list[str]:
        root = Path(_man_root(lang))
        files = sorted(p for p in root.glob("man[1-8]/*") if p.is_file())
        if not files:
            raise RuntimeError(f"no man pages under {root}; install {_packages_for(lang)}")
        rng.shuffle(files)
        # Render only as many pages as the byte cap needs (with margin for duplicates/empties).
        budget, docs = DOMAIN_BYTES[lang] * 1.3, []
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for start in range(0, len(files), 64):
                docs += [t for t in pool.map(_render_man_page, files[start:start + 64]) if t]
                if sum(len(t) for t in docs) > budget:
                    break
        return docs
    return collect


def _packages_for(lang: str) -> str:
    return "manpages" if lang == "en" else f"manpages-{lang} manpages-{lang}-dev"


def _render_man_page(path: Path) -> str:
    """Plain text of one man page, without header/footer lines and credit sections."""
    env = {**os.environ, **_MAN_ENV}
    # man picks the page's encoding from its path and feeds groff through preconv; `man | col -bx`
    # as two processes joined by a pipe: argument lists, no shell, so any file name is safe
    with subprocess.Popen(["man", "--nh", "--nj", "-l", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env) as man:
        try:
            proc = subprocess.run(["col", "-bx"], stdin=man.stdout, capture_output=True, env=env, timeout=60)
        finally:
            man.stdout.close()  # col has read it all (or timed out): man must not block on a full pipe
            man.kill()
    lines = proc.stdout.decode("utf-8", "replace").splitlines()
    if len(lines) < 6:
        return ""
    lines = lines[1:-1]  # header "LS(1)  User Commands  LS(1)" and footer "GNU coreutils 9.1 ..."
    kept, skipping = [], False
    for line in lines:
        if line and not line[0].isspace():  # a section heading starts in column 0
            skipping = line.strip() in _CREDIT_HEADINGS
        if not skipping:
            kept.append(line.rstrip())
    text = "\n".join(kept).strip("\n")
    return text[:MAX_DOCUMENT_BYTES] + "\n" if len(text) > 200 else ""


def _ensure_debian_man_pages() -> None:
    missing = [pkg for pkg in DEBIAN_MAN_PACKAGES
               if subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode != 0]
    if not missing:
        return
    print(f"[corpus] installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


# --- helpers ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    return text[:MAX_DOCUMENT_BYTES] if text.strip() else ""


def _dedupe(docs: Iterable[str]) -> list[str]:
    """Drop documents whose whitespace-normalised text was seen before (order kept)."""
    seen, out = set(), []
    for doc in docs:
        key = hashlib.sha1(" ".join(doc.split()).encode()).digest()
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def _cap_bytes(docs: list[str], cap: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total >= cap:
            break
        out.append(doc)
        total += len(doc.encode())
    return out


def _write_jsonl(path: Path, texts: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: build the corpus; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moelens.training.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing man pages")
    args = parser.parse_args(argv)
    manifest = build_corpus(args.out, seed=args.seed, install_missing=not args.no_install)
    total = sum(d["train_bytes"] + d["heldout_bytes"] for d in manifest["domains"].values())
    print(f"corpus written to {args.out} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
