"""Batch trace collection (``moelens collect``): prompts in, a crash-safe trace store out.

``collect`` takes a model name (loaded here) or a model object with its tokenizer, and a prompt
file or records (dicts with ``text`` and tag fields). The tokenise-batch-trace loop,
:func:`trace_records`, is shared with ``moelens.trace(model, prompts=[...])``.

Prompts are split into fixed shards (``shard_size`` consecutive prompts); shard ``i`` belongs to
rank ``i % world_size`` under torchrun. Each shard is traced batch by batch and written with
:func:`moelens.store.write_shard` (temporary names, renamed when complete, marker last), so a run
killed at any point and rerun with ``resume=True`` writes every expected row exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelens import store
from moelens.errors import CollectError, PromptFileError
from moelens.hooks.adapters import input_device, text_config

# Library logging: the run's summary is INFO (silent unless the caller asks: the CLI shows it, a
# notebook does not print it in red), what changes the result or the store is a WARNING.
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa

    from moelens.tracer import Tracer


@dataclass(frozen=True)
class CollectOptions:
    """How :func:`collect` runs: prompts per forward call, tokens generated per prompt (0: prompts
    only), router logits, resuming an interrupted store, truncating over-long prompts, prompts per
    shard, the model's placement when loaded by name (device, dtype, device_map, max_memory,
    offload_folder), and the progress bar."""

    batch_size: int = 8
    max_new_tokens: int = 0
    full_logits: bool = False
    resume: bool = False
    truncate: bool = False  # cut prompts longer than the context (default: refuse them)
    shard_size: int = 64  # prompts per shard: the unit of crash safety and of torchrun sharding
    device: str | None = None
    dtype: str | None = None
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, Any] | None = None
    offload_folder: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be at least 1 (got {self.shard_size})")
        if self.max_new_tokens < 0:
            raise ValueError(f"max new tokens must be 0 or more (got {self.max_new_tokens})")


# --- prompts ---------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read prompts as records ``{"prompt_id", "text", <tags>...}`` from .txt, .jsonl, .csv or .parquet.

    ``prompt_id`` is the record's ``id`` field if the file has one, else the 0-based line/row number.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .jsonl, .csv or .parquet")
    located = list(readers[suffix](path))
    if not located:
        raise PromptFileError(f"{path} holds no prompts: add one prompt per line (.txt) or record (.jsonl/.csv/.parquet)")
    return _checked_records(located, path)


def prompt_records(prompts: Sequence[str | Mapping[str, Any]], tags: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """Records ``{"prompt_id", "text", <tags>...}`` from prompts given in Python, checked as
    :func:`read_prompts` checks a file's.

    ``prompts``: strings, or records (dicts with a ``text`` string, an optional ``id`` and tag
    fields). ``tags``: {tag column: one value per prompt}, added to each record (a column that a
    record already has is an error). ``prompt_id``: the ``id`` field, else the 0-based index.
    """
    if isinstance(prompts, (str, Mapping)):
        raise PromptFileError("prompts must be a list of strings or records (dicts with a `text` field), not a single one")
    located = [(f"prompt {i}", {"text": p} if isinstance(p, str) else dict(p)) for i, p in enumerate(prompts)]
    if not located:
        raise PromptFileError("no prompts given: pass at least one string or record")
    for column, values in (tags or {}).items():
        values = list(values)
        if len(values) != len(located):
            raise PromptFileError(f"tag {column!r} has {len(values)} values for {len(located)} prompts: give one value per prompt")
        for (where, record), value in zip(located, values):
            if column in record:
                raise PromptFileError(f"{where}: tag {column!r} is both a field of the record and in tags=; give it once")
            record[column] = value
    return _checked_records(located, "prompts")


def _checked_records(located: list[tuple[str, dict[str, Any]]], source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``(where, record)`` pairs checked (a non-empty ``text`` string each) and given prompt ids
    (``id`` field, else the row number); errors name ``source`` and ``where``."""
    for row, (where, record) in enumerate(located):
        text = record.get("text")
        if not isinstance(text, str):
            raise PromptFileError(f"{source}, {where}: no `text` field (a string) in {sorted(record)}")
        if not text.strip():
            raise PromptFileError(f"{source}, {where}: the prompt is empty; remove it or give it text")
        record.setdefault("id", row)
    return with_prompt_ids([record for _, record in located], source)


def _read_text(path: Path, newline: str | None = None) -> io.StringIO:
    """The file's text (UTF-8), or a :class:`PromptFileError` that says where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return io.StringIO(data.decode("utf-8"), newline=newline)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise PromptFileError(
            f"{path}, line {line}, column {column}: not UTF-8 (byte 0x{data[error.start]:02x}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_txt(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(_read_text(path), start=1):
        yield f"line {number}", {"text": line.rstrip("\n")}


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path}, line {number}: expected a JSON object with a `text` field")
        yield f"line {number}", record


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, record in enumerate(csv.DictReader(_read_text(path, newline="")), start=2):
        yield f"line {number}", dict(record)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"row {number}", record


def with_prompt_ids(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``records`` with their ``id`` field (removed) turned into a leading ``prompt_id``: integers if
    every id is one (0 <= id < 2**32), strings otherwise; raises :class:`PromptFileError` on a repeat.

    Every record gets every field any record has (``None`` where it has none), in the order they
    first appear: a prompts table takes its columns from the first record, and every shard of a
    store must have the same columns, so a tag only later records carry is not lost.
    """
    ids = [record.pop("id") for record in records]
    as_int = [_as_uint(value) for value in ids]
    final: list[Any] = as_int if all(v is not None for v in as_int) else [str(v) for v in ids]
    repeated = [value for value, count in Counter(final).items() if count > 1]
    if repeated:
        raise PromptFileError(f"{path}: prompt id {repeated[0]!r} appears more than once; ids must be unique")
    fields = list(dict.fromkeys(key for record in records for key in record))
    return [{"prompt_id": pid, **{key: record.get(key) for key in fields}} for pid, record in zip(final, records)]


def _as_uint(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        return number if 0 <= number < 2**32 else None
    return None


# --- the store's lifecycle -------------------------------------------------------------------
def open_for_writing(out: Path, resume: bool, lock: store.WriterLock) -> None:
    """Create ``out``, refuse an existing store without ``resume``, take the store's writer lock.

    The "already a store" check runs before the lock (a refused run leaves the store untouched)
    and again under it (a run that started at the same moment may have just written its manifest).
    """

    def refuse_existing() -> None:
        if (out / store.MANIFEST).exists() and not resume:
            raise CollectError(
                f"{out} already holds a trace store. Choose another --out, or pass --resume to continue an "
                "interrupted `moelens collect` into it (nothing was written)."
            )

    refuse_existing()
    if out.exists() and not out.is_dir():
        raise CollectError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire(log.warning)
    except OSError as error:
        raise CollectError(f"cannot write to --out {out}: {error.strerror or error}. Choose a writable directory.") from None
    try:
        refuse_existing()
    except CollectError:
        lock.release()
        raise


def _comparable(manifest: store.Manifest) -> store.Manifest:
    """``manifest`` with its intervention in today's spec format (a store written by an older
    moelens records the same spec in older words: ``only_layers``, ranks from 1)."""
    if manifest.intervention is None:
        return manifest
    from dataclasses import replace

    from moelens.interventions import Intervention

    return replace(manifest, intervention=Intervention.from_dict(manifest.intervention, where="the store's manifest").to_dict())


def _check_resume(out: Path, manifest: store.Manifest) -> None:
    existing = store.read_manifest(out)
    if _comparable(existing).identity() != manifest.identity():
        raise CollectError(
            f"--resume into {out}: the store was recorded from model {existing.model!r} (config "
            f"{existing.config_hash[:12]}, intervention {existing.intervention}), not from {manifest.model!r} "
            f"(config {manifest.config_hash[:12]}, intervention {manifest.intervention}). Use a new --out."
        )
    if existing.collection.get("prompts_sha") != manifest.collection.get("prompts_sha"):
        raise CollectError(
            f"--resume into {out}: the prompts of {manifest.collection.get('prompts')} differ from those the store was "
            f"started with ({existing.collection.get('prompts')}, {existing.collection.get('num_prompts')} prompts, "
            "content hash recorded in the manifest). Resume with that same file, or collect into a new --out."
        )


def _repair_finished(out: Path, warn: Callable[[str], object]) -> set[str]:
    """The sound finished shards; a corrupt one is moved to quarantine/ and collected again."""
    sound = set()
    for name in store.finished_shards(out):
        problem = store.verify_shard(out, name)
        if problem is None:
            sound.add(name)
            continue
        store.remove_shard(out, name, quarantine=True)
        warn(f"moelens: corrupt shard {name} ({problem}); its files were moved to {out / 'quarantine'} and it will be collected again")
    return sound


# --- collection ------------------------------------------------------------------------------
def collect(
    model: str | Any,
    prompts: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]],
    out: str | os.PathLike[str],
    options: CollectOptions = CollectOptions(),
    *,
    tokenizer: Any = None,
    intervention: Any = None,
) -> store.StoredTrace:
    """Trace every prompt through ``model`` into the store at ``out``.

    Args:
        model: a name :func:`moelens.load` accepts (loaded here, with ``options``' device, dtype and
            placement), or a loaded model object; then ``tokenizer`` is required and the placement
            options must be left unset (place the model yourself).
        prompts: a prompt file (.txt, .jsonl, .csv, .parquet; see :func:`read_prompts`) or records
            as :func:`prompt_records` takes them (strings, or dicts with ``text`` and tag fields).
        out: the store directory to create (or continue with ``options.resume``).
        tokenizer: the model object's tokenizer (refused with a name: the loader gives it). A
            tokenizer without a pad token pads with its EOS token during the run.
        intervention: an intervention spec applied while tracing (recorded in the manifest).

    Raises :class:`PromptFileError`, :class:`CollectError`, or the loader's errors, before
    anything is written where possible.
    """
    out = Path(out)
    named = isinstance(model, (str, os.PathLike))
    if named and tokenizer is not None:
        raise CollectError(f"tokenizer= goes with a loaded model object; with the name {str(model)!r} collect loads the model's own tokenizer: drop tokenizer=")
    if not named:
        _check_model_object(tokenizer, options)
    from_file = isinstance(prompts, (str, os.PathLike))
    records = read_prompts(prompts) if from_file else prompt_records(prompts)
    source = str(prompts) if from_file else f"{len(records)} records given in Python"
    rank, world = _distributed_rank()
    lock = store.WriterLock(out)
    # one lock per store, held by rank 0 for the whole run; the other ranks learn its outcome
    _on_rank_zero(rank, world, lambda: open_for_writing(out, options.resume, lock))
    try:
        if named:
            model_name = str(model)
            from moelens.loading import load

            placement = {k: v for k, v in (("max_memory", options.max_memory), ("offload_folder", options.offload_folder)) if v is not None}
            model, tokenizer = load(model, device=options.device, dtype=options.dtype, device_map=options.device_map, **placement)
        else:
            model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        return _collect_locked(model, tokenizer, model_name, records, source, out, options, intervention, rank, world)
    finally:
        lock.release()


def _check_model_object(tokenizer: Any, options: CollectOptions) -> None:
    """Refuse what ``collect`` cannot do with a model it did not load."""
    if tokenizer is None:
        raise CollectError("collect(model, ...) with a model object needs its tokenizer: pass tokenizer= (moelens.load returns both)")
    placement = [name for name in ("device", "dtype", "device_map", "max_memory", "offload_folder") if getattr(options, name) is not None]
    if placement:
        raise CollectError(
            f"CollectOptions {placement} apply when collect loads the model by name; this model is already loaded: "
            "place it yourself (model.to(...), or load it with those options) and leave them unset"
        )


def _collect_locked(
    model: Any,
    tokenizer: Any,
    model_name: str,
    records: list[dict[str, Any]],
    source: str,
    out: Path,
    options: CollectOptions,
    intervention: Any,
    rank: int,
    world: int,
) -> store.StoredTrace:
    check_lengths(model, tokenizer, records, max_new_tokens=options.max_new_tokens, truncate=options.truncate)
    if intervention is not None:
        from moelens.interventions.apply import bind

        bind(model, intervention)  # a spec that does not fit the model fails before anything is written
    manifest = _manifest(model, tokenizer, model_name, records, source, options, intervention)
    if rank == 0:
        if options.resume and (out / store.MANIFEST).exists():
            _check_resume(out, manifest)
        else:
            store.write_manifest(out, manifest)
    _barrier(world)
    if rank != 0:
        _check_resume(out, manifest)
    done = _repair_finished(out, log.warning) if options.resume else set()
    shards = [
        (index, records[start : start + options.shard_size])
        for index, start in enumerate(range(0, len(records), options.shard_size))
        if index % world == rank and store.shard_name(index) not in done
    ]
    from moelens.interventions import Intervention, intervene

    with intervene(model, intervention or Intervention()):
        # every shard's prompts table in the types of the whole prompt set: a tag that is null
        # throughout one shard must not make that shard's column a null column
        prompts_schema = prompts_table(records, manifest.layout).schema
        stats = _run_shards(model, tokenizer, manifest.layout, prompts_schema, shards, out, options, rank)
    _barrier(world)
    if rank == 0:
        manifest = store.read_manifest(out)
        manifest.shards = store.finished_shards(out)
        store.write_manifest(out, manifest)
        _summary(out, stats, world)
    return store.scan_trace(out)


def _manifest(model: Any, tokenizer: Any, model_name: str, records: list[dict[str, Any]], source: str, options: CollectOptions, intervention: Any) -> store.Manifest:
    import hashlib

    import transformers

    import moelens
    from moelens.hooks.adapters import moe_layers, moe_view
    from moelens.tracer import store_layout

    layers = moe_layers(model)
    id_type = "string" if isinstance(records[0]["prompt_id"], str) else "uint32"
    config_json = model.config.to_json_string(use_diff=False)
    prompts_sha = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()
    collection = {
        k: v for k, v in asdict(options).items() if k not in ("resume", "progress", "device", "device_map", "max_memory", "offload_folder")
    } | {"prompts": source, "prompts_sha": prompts_sha, "num_prompts": len(records)}
    return store.Manifest(
        model=str(model_name),
        config_hash=hashlib.sha256(config_json.encode()).hexdigest(),
        family=moe_view(model).model_type,
        layout=store_layout(model, layers, prompt_id_type=id_type),
        moe_layers=[layer.index for layer in layers],
        moelens_version=moelens.__version__,
        transformers_version=transformers.__version__,
        collection=collection,
        intervention=intervention.to_dict() if intervention is not None else None,
        special_token_ids=store.special_token_ids_of(tokenizer),
    )


def prompt_limit(model: Any, max_new_tokens: int) -> int | None:
    """The most tokens a prompt may have: the model's context (``max_position_embeddings``) less
    ``max_new_tokens``; ``None`` when the config does not give the context."""
    context = int(getattr(text_config(model), "max_position_embeddings", 0) or 0)
    return context - max_new_tokens if context else None


def check_lengths(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], *, max_new_tokens: int, truncate: bool) -> None:
    """Refuse prompts longer than :func:`prompt_limit` (a :class:`CollectError` naming the first),
    or with ``truncate`` say that they will be cut."""
    limit = prompt_limit(model, max_new_tokens)
    if limit is None or not records:
        return
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in records])["input_ids"]]
    too_long = [(r["prompt_id"], n) for r, n in zip(records, lengths) if n > limit]
    if not too_long:
        return
    first_id, first_len = too_long[0]
    if not truncate:
        raise CollectError(
            f"{len(too_long)} prompt(s) are longer than the model's context allows: prompt {first_id!r} has "
            f"{first_len} tokens, the limit is {limit} ({limit + max_new_tokens} context - {max_new_tokens} new tokens). "
            "They were refused; pass --truncate (truncate=True in Python) to cut them to the limit (keeping their beginning)."
        )
    log.warning(f"moelens: {len(too_long)} prompt(s) longer than {limit} tokens are truncated to their first {limit} tokens")


def trace_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    truncate: bool = False,
    on_batch: Callable[[int], None] | None = None,
    **tracer_options: Any,
) -> Tracer:
    """Run ``records`` (``prompt_id``, ``text``, tags) through ``model`` under one tracer and
    return it finished; its ``prompts`` table is ``records``.

    The records are fed in order, ``batch_size`` per forward call, tokenized with left padding
    (decode steps append on the right; padding is not recorded) and, with ``truncate``, cut to the
    context less ``max_new_tokens``. ``max_new_tokens`` > 0: greedy ``generate`` of that many tokens
    per prompt, traced too. ``on_batch(n)`` is called after each batch of ``n`` prompts;
    ``tracer_options`` go to :class:`moelens.tracer.Tracer` (``full_logits``, ``layout``, ...).
    """
    import torch

    from moelens.tracer import Tracer

    limit = prompt_limit(model, max_new_tokens) if truncate else None
    device = input_device(model)
    tracer = Tracer(model, tokenizer=tokenizer, records=records, **tracer_options)
    with torch.no_grad(), _padding(tokenizer) as pad_token_id, tracer:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            encoded = tokenizer(
                [r["text"] for r in batch], return_tensors="pt", padding=True, padding_side="left",
                truncation=limit is not None, max_length=limit,
            ).to(device)
            if max_new_tokens:
                model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
            else:
                model(**encoded)
            if on_batch is not None:
                on_batch(len(batch))
    return tracer


@contextmanager
def _padding(tokenizer: Any) -> Iterator[int]:
    """The tokenizer's pad token id; a tokenizer without a pad token pads with its EOS meanwhile."""
    if tokenizer.pad_token is not None:
        yield tokenizer.pad_token_id
        return
    if tokenizer.eos_token is None:
        raise CollectError("the tokenizer has neither a pad token nor an EOS token to pad batches with: set tokenizer.pad_token")
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.pad_token = None


def _run_shards(
    model: Any, tokenizer: Any, layout: store.StoreLayout, prompts_schema: pa.Schema,
    shards: list[tuple[int, list[dict[str, Any]]]], out: Path, options: CollectOptions, rank: int,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    stats = {"prompts": 0, "tokens": 0, "events": 0, "seconds": 0.0}
    bar = tqdm(total=sum(len(s) for _, s in shards), unit="prompt", disable=not options.progress, desc=f"rank {rank}" if rank else "collect", file=sys.stderr)
    started = time.perf_counter()
    for index, records in shards:
        tracer = trace_records(
            model, tokenizer, records, batch_size=options.batch_size, max_new_tokens=options.max_new_tokens,
            truncate=options.truncate, on_batch=bar.update, full_logits=options.full_logits, layout=layout,
        )
        tables = tracer.tables()
        tables["prompts"] = tables["prompts"].cast(prompts_schema)
        stats["tokens"] += tables["tokens"].num_rows
        stats["events"] += tables["routes"].num_rows
        stats["prompts"] += len(records)
        bar.set_postfix(tokens_per_s=f"{stats['tokens'] / max(time.perf_counter() - started, 1e-9):.0f}")
        try:
            store.write_shard(out, index, tables)
        except OSError as error:
            raise CollectError(
                f"writing {store.shard_name(index)} into {out} failed: {error.strerror or error}. That shard was left "
                f"out; the {len(store.finished_shards(out))} finished shards and the manifest are intact. Fix the cause "
                "(free disk space, permissions), then rerun the same command with --resume to complete the store."
            ) from error
    bar.close()
    stats["seconds"] = time.perf_counter() - started
    return stats


def prompts_table(records: list[dict[str, Any]], layout: store.StoreLayout) -> pa.Table:
    """The prompts table of ``records`` (``prompt_id``, ``text``, tags) with the layout's prompt id type."""
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    prompt_id_type = layout.tokens_schema().field("prompt_id").type
    return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", table["prompt_id"].cast(prompt_id_type))


def _summary(out: Path, stats: dict[str, float], world: int) -> None:
    routes_bytes = sum(p.stat().st_size for p in (out / "routes").glob("shard-*.parquet"))
    stored = store.scan_trace(out)
    events = int(stored.sql("SELECT count(*) AS n FROM routes")["n"][0]) if stored.shards else 0
    seconds = max(stats["seconds"], 1e-9)
    log.info(
        f"moelens collect: {len(stored.shards)} shards, {events:,} routing events in {out}"
        f" ({routes_bytes / max(events, 1):.2f} bytes/event on disk); this run (rank 0 of {world}): "
        f"{int(stats['prompts'])} prompts, {int(stats['tokens']):,} tokens in {seconds:.1f}s "
        f"({stats['tokens'] / seconds:,.0f} tokens/s)"
    )



def _distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Starts a gloo group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _on_rank_zero(rank: int, world: int, action: Any) -> None:
    """Run ``action`` on rank 0; if it raises, every rank raises (the others with its message)."""
    failure: BaseException | None = None
    if rank == 0:
        try:
            action()
        except Exception as error:  # re-raised below, after the other ranks have been told
            failure = error
    if world > 1:
        import torch.distributed as dist

        message = [f"rank 0: {failure}" if failure is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and failure is None:
            raise CollectError(message[0])
    if failure is not None:
        raise failure


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
