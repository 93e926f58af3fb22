"""Write the project's probe sets (``data/probes/*.jsonl``) from templates and generators.

Every text here is authored by moelens: hand-written sentence templates (technical prose in
English, German, French and Spanish in the style of a manual page), generated Python and C, and
generated arithmetic. Nothing is taken from the training corpus, whose sources belong to their
authors. Output is deterministic for a given ``seed``.

Files (JSONL, one object a line, always with ``text``):

- ``domains.jsonl``: ``PER_DOMAIN`` prompts per domain, field ``domain``;
- ``markers.jsonl``: prompts with field ``markers`` (which of :data:`MARKERS` the text contains)
  and ``domain``; every marker occurs in at least 60 prompts, and some prompts contain none;
- ``arith_tasks.jsonl``: few-shot arithmetic questions ending in ``=``, fields ``answer`` (string),
  ``op``, ``domain``;
- ``calibration.jsonl``: a mixed set (``CALIBRATION_PER_DOMAIN`` per domain), field ``domain``.

Prompt lengths aim at 16-96 tokens of the ``moelens-tiny`` tokenizer; pass ``tokenizer`` to
enforce that exactly (otherwise ~4 characters per token is assumed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from moelens.training.corpus import DOMAINS, arith_answer, arith_equation

MARKERS = ("def", "return", "#include", "=")
PER_DOMAIN = 100
CALIBRATION_PER_DOMAIN = 20
ARITH_TASKS = 120
MIN_TOKENS, MAX_TOKENS = 16, 96

# --- technical prose ---------------------------------------------------------------------------
# Slots: {cmd} command, {opt} short option, {long} long option, {file} path, {n} number, {env} variable.
_PROSE = {
    "en": [
        "The {cmd} command reads {file} and writes the result to standard output.",
        "If the option {opt} is given, {cmd} prints a message for every file it processes.",
        "On success, zero is returned. On error, -1 is returned and errno is set to indicate the error.",
        "This option may be specified more than once.",
        "By default, {cmd} waits {n} seconds before it gives up.",
        "The file {file} contains the default configuration of {cmd}.",
        "If the buffer is smaller than {n} bytes, the call fails with the error EINVAL.",
        "Options given on the command line override the values read from the configuration file.",
        "Lines that start with a hash sign are treated as comments and ignored.",
        "The environment variable {env} selects the directory in which temporary files are created.",
        "{opt}, {long}\n       Do not print the header line.",
        "{opt}, {long}\n       Show the version number and exit.",
        "The exit status is 0 if all files were processed, and 1 if an error occurred.",
        "Without arguments, {cmd} lists the entries of the current directory.",
        "Only the superuser may change the owner of {file}.",
    ],
    "de": [
        "Der Befehl {cmd} liest {file} und schreibt das Ergebnis in die Standardausgabe.",
        "Wird die Option {opt} angegeben, gibt {cmd} für jede verarbeitete Datei eine Meldung aus.",
        "Bei Erfolg wird Null zurückgegeben. Im Fehlerfall wird -1 zurückgegeben und errno gesetzt, um den Fehler anzuzeigen.",
        "Diese Option kann mehrfach angegeben werden.",
        "Standardmäßig wartet {cmd} {n} Sekunden, bevor es aufgibt.",
        "Die Datei {file} enthält die Standardeinstellungen von {cmd}.",
        "Ist der Puffer kleiner als {n} Byte, schlägt der Aufruf mit dem Fehler EINVAL fehl.",
        "Auf der Befehlszeile angegebene Optionen haben Vorrang vor den Werten aus der Konfigurationsdatei.",
        "Zeilen, die mit einem Rautezeichen beginnen, werden als Kommentare behandelt und ignoriert.",
        "Die Umgebungsvariable {env} legt das Verzeichnis fest, in dem temporäre Dateien angelegt werden.",
        "{opt}, {long}\n       Die Kopfzeile nicht ausgeben.",
        "{opt}, {long}\n       Die Versionsnummer anzeigen und beenden.",
        "Der Rückgabewert ist 0, wenn alle Dateien verarbeitet wurden, und 1, wenn ein Fehler auftrat.",
        "Ohne Argumente zeigt {cmd} die Einträge des aktuellen Verzeichnisses an.",
        "Nur der Systemverwalter darf den Eigentümer von {file} ändern.",
    ],
    "fr": [
        "La commande {cmd} lit {file} et écrit le résultat sur la sortie standard.",
        "Si l'option {opt} est indiquée, {cmd} affiche un message pour chaque fichier traité.",
        "En cas de succès, zéro est renvoyé. En cas d'erreur, -1 est renvoyé et errno est positionné pour indiquer l'erreur.",
        "Cette option peut être indiquée plusieurs fois.",
        "Par défaut, {cmd} attend {n} secondes avant d'abandonner.",
        "Le fichier {file} contient la configuration par défaut de {cmd}.",
        "Si le tampon est plus petit que {n} octets, l'appel échoue avec l'erreur EINVAL.",
        "Les options indiquées sur la ligne de commande remplacent les valeurs lues dans le fichier de configuration.",
        "Les lignes qui commencent par un croisillon sont considérées comme des commentaires et ignorées.",
        "La variable d'environnement {env} indique le répertoire dans lequel les fichiers temporaires sont créés.",
        "{opt}, {long}\n       Ne pas afficher la ligne d'en-tête.",
        "{opt}, {long}\n       Afficher le numéro de version et quitter.",
        "Le code de retour vaut 0 si tous les fichiers ont été traités, et 1 si une erreur s'est produite.",
        "Sans argument, {cmd} affiche les entrées du répertoire courant.",
        "Seul le superutilisateur peut changer le propriétaire de {file}.",
    ],
    "es": [
        "La orden {cmd} lee {file} y escribe el resultado en la salida estándar.",
        "Si se indica la opción {opt}, {cmd} muestra un mensaje por cada archivo que procesa.",
        "En caso de éxito se devuelve cero. En caso de error se devuelve -1 y se asigna errno para indicar el error.",
        "Esta opción puede indicarse más de una vez.",
        "De forma predeterminada, {cmd} espera {n} segundos antes de rendirse.",
        "El archivo {file} contiene la configuración predeterminada de {cmd}.",
        "Si el búfer es menor que {n} bytes, la llamada falla con el error EINVAL.",
        "Las opciones indicadas en la línea de órdenes tienen prioridad sobre los valores del archivo de configuración.",
        "Las líneas que empiezan por una almohadilla se tratan como comentarios y se ignoran.",
        "La variable de entorno {env} selecciona el directorio en el que se crean los archivos temporales.",
        "{opt}, {long}\n       No mostrar la línea de cabecera.",
        "{opt}, {long}\n       Mostrar el número de versión y salir.",
        "El estado de salida es 0 si se procesaron todos los archivos, y 1 si se produjo un error.",
        "Sin argumentos, {cmd} muestra las entradas del directorio actual.",
        "Solo el superusuario puede cambiar el propietario de {file}.",
    ],
}
_CMDS = ("tar", "grep", "mount", "ls", "cp", "find", "sort", "crontab", "ssh", "kill", "chmod", "df")
_FILES = ("/etc/fstab", "/etc/passwd", "~/.profile", "/var/log/syslog", "/etc/hosts", "/proc/meminfo")
_ENVS = ("TMPDIR", "HOME", "LANG", "PAGER", "EDITOR", "PATH")
_LONGS = ("--verbose", "--quiet", "--recursive", "--force", "--all", "--numeric", "--version")

# --- code ----------------------------------------------------------------------------------------
_VERBS = ("parse", "load", "count", "merge", "split", "render", "check", "collect", "update", "find")
_NOUNS = ("items", "lines", "records", "names", "values", "tokens", "paths", "entries", "blocks", "keys")
_C_TYPES = ("int", "long", "size_t", "unsigned int", "char *", "const char *", "void *", "double")
_HEADERS = ("stdio", "stdlib", "string", "stdint", "errno", "unistd", "fcntl", "time", "signal", "limits")


def _slots(rng: random.Random) -> dict[str, str]:
    return {"cmd": rng.choice(_CMDS), "opt": f"-{rng.choice('abcdfhlnqrv')}", "long": rng.choice(_LONGS),
            "file": rng.choice(_FILES), "n": str(rng.choice((2, 5, 10, 30, 64, 128, 512, 4096))),
            "env": rng.choice(_ENVS)}


def _prose_piece(lang: str) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(_PROSE[lang]).format(**_slots(rng))


def _python_piece(rng: random.Random, *, with_def: bool = True) -> str:
    verb, noun, other = rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_NOUNS)
    n = rng.randint(1, 99)
    if not with_def:
        return rng.choice((
            f"{noun} = [{other}[i] for i in range({n})]\n",
            f"import {rng.choice(('os', 're', 'json', 'sys', 'math'))}\n",
            f"{noun}_total = sum(len(x) for x in {other})\n",
            f"if len({noun}) > {n}:\n    {noun} = {noun}[:{n}]\n",
            f"for key, value in {noun}.items():\n    {other}[key] = value * {n}\n",
        ))
    return rng.choice((
        f"def {verb}_{noun}({other}, limit={n}):\n    result = []\n    for item in {other}:\n"
        f"        if len(item) > limit:\n            result.append(item)\n    return result\n\n",
        f"def {verb}_{noun}(self):\n    \"\"\"Return the {noun} of this object.\"\"\"\n"
        f"    return [x for x in self._{noun} if x is not None]\n\n",
        f"class {verb.title()}{noun.title()}:\n    def __init__(self, {other}):\n        self.{other} = {other}\n\n"
        f"    def __len__(self):\n        return len(self.{other})\n\n",
        f"def {verb}(path, encoding=\"utf-8\"):\n    with open(path, encoding=encoding) as f:\n"
        f"        return f.read().splitlines()[:{n}]\n\n",
        f"def {verb}_{noun}(mapping, default=None):\n    try:\n        return mapping[\"{other}\"]\n"
        f"    except KeyError:\n        return default\n\n",
    ))


def _c_piece(rng: random.Random, *, with_include: bool = False) -> str:
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
    if with_include:
        return f"#include <{rng.choice(_HEADERS)}.h>\n"
    return rng.choice((
        f"extern {rng.choice(_C_TYPES)} {verb}_{noun}({rng.choice(_C_TYPES)} __{noun}, size_t __n);\n",
        f"#define {noun.upper()}_{verb.upper()}_MAX {rng.choice((16, 64, 256, 1024, 4096))}\n",
        f"struct {noun}_info {{\n    {rng.choice(_C_TYPES)} {verb}_count;\n    unsigned int flags;\n}};\n",
        f"typedef {rng.choice(_C_TYPES)} {noun}_t;\n",
        f"/* Return the number of {noun}, or -1 on error.  */\n",
        f"static inline int {verb}_{noun}_valid(const struct {noun}_info *p)\n{{\n    return p != NULL;\n}}\n",
    ))


def _arith_piece(rng: random.Random) -> str:
    return arith_equation(rng) + "\n"


_PIECES: dict[str, Callable[[random.Random], str]] = {
    "python": _python_piece, "c": _c_piece, "arith": _arith_piece,
    **{lang: _prose_piece(lang) for lang in _PROSE},
}


def write_probes(out_dir: Path, seed: int = 0, tokenizer=None) -> dict[str, int]:
    """Write the four probe files into ``out_dir``; returns the number of prompts per file.

    ``tokenizer`` (optional, a transformers tokenizer) makes the 16-96 token bounds exact.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_tokens = ((lambda t: len(tokenizer(t)["input_ids"])) if tokenizer is not None
                else (lambda t: len(t) // 4 + 1))

    def prompt(pieces: list[Callable[[random.Random], str]]) -> str:
        """Pieces drawn in turn until the text reaches a random target length within bounds."""
        target = rng.randint(MIN_TOKENS + 8, MAX_TOKENS - 24)
        text, i = "", 0
        while n_tokens(text) < target:
            piece = pieces[i % len(pieces)](rng)
            if piece in text:  # no sentence twice in one prompt
                continue
            # an option entry of a manual starts its own line
            sep = "" if not text or text.endswith("\n") else "\n" if piece.startswith("-") else " "
            candidate = text + sep + piece
            if n_tokens(candidate) > MAX_TOKENS:
                if n_tokens(text) >= MIN_TOKENS:
                    break
                continue  # too long a piece: draw another
            text, i = candidate, i + 1
        return text.rstrip("\n")

    sets = {
        "domains": [{"text": prompt([_PIECES[d]]), "domain": d} for d in DOMAINS for _ in range(PER_DOMAIN)],
        "calibration": [{"text": prompt([_PIECES[d]]), "domain": d}
                        for d in DOMAINS for _ in range(CALIBRATION_PER_DOMAIN)],
        "markers": _marker_prompts(prompt),
        "arith_tasks": _arith_tasks(rng),
    }
    rng.shuffle(sets["calibration"])
    for name, rows in sets.items():
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {name: len(rows) for name, rows in sets.items()}


def markers_in(text: str) -> list[str]:
    """Which of :data:`MARKERS` occur in ``text`` (keywords as whole words)."""
    found = [m for m in ("def", "return") if re.search(rf"\b{m}\b", text)]
    return found + [m for m in ("#include", "=") if m in text]


def _marker_prompts(prompt: Callable[[list], str]) -> list[dict]:
    recipes = [  # (domain, pieces, count)
        ("python", [_python_piece], 80),  # def and return, plus "="
        ("python", [lambda r: _python_piece(r, with_def=False)], 40),  # "=" without def
        ("c", [lambda r: _c_piece(r, with_include=True), _c_piece, _c_piece], 80),  # #include
        ("arith", [_arith_piece], 70),  # "=" of equations
        *((lang, [_PIECES[lang]], 10) for lang in _PROSE),  # controls without markers
    ]
    rows = []
    for domain, pieces, count in recipes:
        for _ in range(count):
            text = prompt(pieces)
            rows.append({"text": text, "markers": markers_in(text), "domain": domain})
    return rows


def _arith_tasks(rng: random.Random) -> list[dict]:
    """Two solved examples, then a question ``a op b =`` whose ``answer`` is the true value."""
    tasks = []
    for i in range(ARITH_TASKS):
        op = "+-*/"[i % 4]  # every operator equally often
        a, b = rng.randint(1, 999), rng.randint(1, 99 if op in "*/" else 999)
        shots = "".join(_arith_piece(rng) for _ in range(2))
        tasks.append({"text": f"{shots}{a} {op} {b} =", "answer": str(arith_answer(a, op, b)),
                      "op": op, "domain": "arith"})
    return tasks


def main(argv: list[str] | None = None) -> int:
    """Command line: write the probe sets; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moelens.training.probes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/probes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer folder for exact token lengths (e.g. data/models/moelens-tiny)")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(write_probes(args.out, seed=args.seed, tokenizer=tokenizer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
