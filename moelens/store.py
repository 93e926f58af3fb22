"""The trace store: one declared, versioned schema for routing data on disk.

A store is a directory::

    manifest.json            schema version, model, layout, collection arguments, intervention, shards
    prompts/shard-NNNNNN.parquet   prompt_id, text, <tag columns>
    tokens/shard-NNNNNN.parquet    prompt_id, position, token_id, token, generated
    routes/shard-NNNNNN.parquet    prompt_id, position, layer, rank, expert, weight
    logits/shard-NNNNNN.parquet    prompt_id, position, layer, logits   (only with full logits)
    shards/shard-NNNNNN.json       completion marker, written last

``routes`` is long format, one row per (prompt, position, layer, rank); ``rank`` is 0-based in
the family's choice order (the weight order, except where a correction bias steers the choice
but not the weights, as on DeepSeek-V3: there sigmoid(logit) + bias), the order ``rank(r)``
interventions count in (``rank(r)`` routes to this table's rank r); ``weight`` is what the model
multiplied the expert's output by. Stores imported from a serving engine (:mod:`moelens.engines`)
hold expert ids only: their ``weight`` is null, their ``rank`` the engine's slot order, and their
manifest says ``weights: false`` (their ``Trace.weights`` is ``False``; analyses that need weights
call :func:`require_weights`). A shard
counts only once its marker exists: every Parquet file is written under a temporary name and
renamed when complete, and the marker is renamed into place after all of them, so a killed writer
leaves nothing that a reader or ``--resume`` mistakes for data.

The trace protocol: :class:`Trace` is the one interface to routing data, whether recorded in
memory (:func:`moelens.trace`, a :class:`moelens.tracer.Tracer`) or opened from a store
(:func:`scan_trace`, a :class:`StoredTrace`). Every analysis in :mod:`moelens.analysis` takes any
``Trace``. A trace has

* ``routes``, ``tokens``, ``prompts`` (and ``logits`` when recorded): pandas DataFrames in the
  schema above, read on first access and cached; ``prompts`` holds ``prompt_id``, ``text`` (null
  where the trace was not given the text) and one column per tag (e.g. ``domain``);
* ``to_pandas()``: every table, read now, as {name: DataFrame};
* ``sql(query)``: DuckDB over views of the same names, nothing loaded first (``duckdb()``: the connection);
* ``layers``: the MoE layer ids; ``experts``: routed experts per MoE layer;
  ``special_token_ids``: the tokenizer's special ids (what token filters exclude);
  ``weights``: whether ``routes.weight`` holds the routing weights (``False`` only for a store
  imported from a serving engine).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelens.errors import StoreError, StoreLockedError

if TYPE_CHECKING:
    import duckdb
    import numpy as np
    import pandas as pd
    import pyarrow as pa

SCHEMA_VERSION = 1
TABLES = ("prompts", "tokens", "routes", "logits")
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
# the transformers config fields that hold a model's number of routed experts (DeepSeek; Qwen, OLMoE;
# Mixtral, GPT-OSS; Ernie-4.5, DBRX): a config has one of them; readers take the first one present
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")


@dataclass(frozen=True)
class StoreLayout:
    """The sizes that fix the store's column types (smallest integer types that fit)."""

    num_layers: int  # decoder layers, dense ones included (layer ids keep the model's numbering)
    num_experts: int
    top_k: int
    max_positions: int  # an upper bound on prompt + generated length
    prompt_id_type: str = "uint32"  # "uint32" for row numbers and integer ids, "string" otherwise

    def routes_schema(self) -> pa.Schema:
        """Arrow schema of ``routes``: one row per (prompt_id, position, layer, rank)."""
        import pyarrow as pa

        return pa.schema(
            [
                ("prompt_id", self._prompt_id()),
                ("position", _uint_for(self.max_positions)),
                ("layer", _uint_for(self.num_layers)),
                ("rank", pa.uint8()),  # k <= 256 for every family and intervention
                ("expert", _uint_for(self.num_experts + 1)),
                ("weight", pa.float16()),  # nullable: null in stores that hold expert ids only
            ]
        )

    def tokens_schema(self) -> pa.Schema:
        """Arrow schema of ``tokens``: one row per recorded (prompt_id, position)."""
        import pyarrow as pa

        return pa.schema(
            [
                ("prompt_id", self._prompt_id()),
                ("position", _uint_for(self.max_positions)),
                ("token_id", pa.uint32()),
                ("token", pa.string()),
                ("generated", pa.bool_()),
            ]
        )

    def logits_schema(self) -> pa.Schema:
        """Arrow schema of ``logits``: one row per (prompt_id, position, layer), E float16 router logits."""
        import pyarrow as pa

        return pa.schema(
            [
                ("prompt_id", self._prompt_id()),
                ("position", _uint_for(self.max_positions)),
                ("layer", _uint_for(self.num_layers)),
                ("logits", pa.list_(pa.float16(), self.num_experts)),
            ]
        )

    def _prompt_id(self) -> pa.DataType:
        import pyarrow as pa

        return pa.string() if self.prompt_id_type == "string" else pa.uint32()


def _uint_for(bound: int) -> pa.DataType:
    """The smallest unsigned integer type holding every value in ``range(bound)``."""
    import pyarrow as pa

    for bits, dtype in ((8, pa.uint8()), (16, pa.uint16()), (32, pa.uint32())):
        if bound <= 2**bits:
            return dtype
    return pa.uint64()


@dataclass
class Manifest:
    """What ``manifest.json`` holds. ``shards`` lists the finished shards (filled in on close)."""

    model: str
    config_hash: str
    family: str
    layout: StoreLayout
    moe_layers: list[int]
    moelens_version: str
    transformers_version: str
    collection: dict[str, Any] = field(default_factory=dict)
    intervention: dict[str, Any] | None = None
    special_token_ids: list[int] = field(default_factory=list)  # the tokenizer's special tokens (analyses exclude them)
    weights: bool = True  # False: routes.weight is null (expert ids imported from a serving engine)
    engine: dict[str, Any] | None = None  # {"name", "version", "formats"} of a store imported from a serving engine
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema_version: int = SCHEMA_VERSION
    shards: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The manifest as the JSON text of ``manifest.json`` (sorted keys)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Parse ``manifest.json`` text; a :class:`StoreError` names ``where`` if it is not a manifest."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except ValueError as error:
            raise StoreError(
                f"{where} is corrupt ({error}): it was changed outside moelens, which only ever replaces it whole. "
                "The shards' Parquet files are untouched: restore manifest.json from a copy, or collect again into a new --out."
            ) from None
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: store schema version {version}, this moelens reads version {SCHEMA_VERSION}. "
                "Re-collect the trace or use the moelens version that wrote it."
            )
        try:
            data["layout"] = StoreLayout(**data["layout"])
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise StoreError(f"{where} lacks or garbles a field ({error}); restore it from a copy or collect again") from None

    def identity(self) -> tuple[Any, ...]:
        """What must match for two runs to write into the same store."""
        return (self.model, self.config_hash, self.family, self.layout, self.intervention)


def require_weights(tables: Trace, analysis: str) -> None:
    """Raise :class:`StoreError` if the trace's routes hold expert ids but no weights (``tables.weights`` is ``False``)."""
    if tables.weights:
        return
    engine = tables.manifest.engine if isinstance(tables, StoredTrace) else None
    source = (engine or {}).get("name") or "a serving engine"
    raise StoreError(
        f"this store was imported from {source} and holds expert ids only; {analysis} needs routing weights. "
        "Trace the prompts with `moelens collect` to record weights, or use an analysis of expert choices "
        "(frequency, load balance, co-activation, transitions, fTRI, nPMI)."
    )


def special_token_ids_of(tokenizer: Any) -> list[int]:
    """The tokenizer's special token ids, sorted (what traces and manifests record; [] without one)."""
    return sorted(int(i) for i in getattr(tokenizer, "all_special_ids", ()))


class WriterLock:
    """The exclusive right to write a store: ``<root>/writer.lock``, held for a whole run.

    The holder is the process that holds an ``flock`` on the file (the kernel releases it when
    the process ends, however it ends); the file's content, the holder's pid, host and start
    time, is only there to name the holder in messages. The file is never deleted (a deleted
    lock file that another process has already opened would let two writers in), only emptied
    on release. A lock whose holder died (killed, crashed) is taken over with a message.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, log: Any = None) -> None:
        """Take the lock or raise :class:`StoreLockedError` naming the holder (never waits)."""
        import fcntl
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the holder writes its record just after taking the lock: give it a moment to appear
            holder = _lock_holder(fd)
            for _ in range(50):
                if holder != "unknown holder":
                    break
                time.sleep(0.02)
                holder = _lock_holder(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{self.path.parent} is being written by another moelens process ({holder}). Two writers "
                "would lose each other's prompts: wait for it to finish, or write to another --out."
            ) from None
        previous = _lock_holder(fd)
        if previous != "unknown holder" and log is not None:
            log(f"moelens: took over the lock of {self.path.parent}: its holder ({previous}) ended without releasing it")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (removing the holder file); a no-op when not held."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _lock_holder(fd: int) -> str:
    """'pid N on host H since T' from a lock file's content, or 'unknown holder' if empty."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {record['pid']} on host {record['host']} since {record['started']}"
    except (ValueError, TypeError, KeyError):
        return "unknown holder"


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically (a crash leaves the old one or the new one)."""
    _write_atomic(root / MANIFEST, lambda tmp: tmp.write_text(manifest.to_json()))


def read_manifest(root: Path) -> Manifest:
    """Read ``root/manifest.json``; a :class:`StoreError` says when ``root`` is not a store."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{root} is not a moelens trace store: it has no {MANIFEST}.")
    return Manifest.from_json(path.read_text(), path)


def shard_name(index: int) -> str:
    """The file stem of shard ``index`` (``shard-000003``)."""
    return f"shard-{index:06d}"


def _parquet_options(table_name: str) -> dict[str, Any]:
    # ids, positions, layers and ranks are long sorted runs that dictionary + RLE encode to almost
    # nothing; float16 weights stay PLAIN (DuckDB cannot read BYTE_STREAM_SPLIT on float16 columns).
    options: dict[str, Any] = dict(compression="zstd", compression_level=6, row_group_size=1 << 20)
    if table_name == "routes":
        options.update(use_dictionary=["prompt_id", "position", "layer", "rank", "expert"])
    return options


def write_shard(root: Path, index: int, tables: Mapping[str, pa.Table]) -> dict[str, int]:
    """Write one shard's tables, then its completion marker. Returns rows per table."""
    import pyarrow.parquet as pq

    name = shard_name(index)
    rows = {}
    for table_name, table in tables.items():
        folder = root / table_name
        folder.mkdir(exist_ok=True)
        _write_atomic(folder / f"{name}.parquet", lambda tmp, t=table, n=table_name: pq.write_table(t, tmp, **_parquet_options(n)))
        rows[table_name] = table.num_rows
    markers = root / "shards"
    markers.mkdir(exist_ok=True)
    _write_atomic(markers / f"{name}.json", lambda tmp: tmp.write_text(json.dumps({"shard": name, "rows": rows})))
    return rows


def finished_shards(root: Path) -> list[str]:
    """Names of the shards whose completion marker exists, sorted."""
    markers = Path(root) / "shards"
    return sorted(p.stem for p in markers.glob("shard-*.json")) if markers.is_dir() else []


def verify_shard(root: Path, name: str) -> str | None:
    """Why the finished shard ``name`` is unreadable or incomplete, or ``None`` if it is sound."""
    import pyarrow.parquet as pq

    try:
        expected = json.loads((root / "shards" / f"{name}.json").read_text())["rows"]
    except (OSError, ValueError, KeyError) as error:
        return f"marker unreadable ({error})"
    for table_name, rows in expected.items():
        path = root / table_name / f"{name}.parquet"
        try:
            found = pq.ParquetFile(path).metadata.num_rows
        except Exception as error:  # pyarrow raises several types for truncated or garbled files
            return f"{path.relative_to(root)} unreadable ({error})"
        if found != rows:
            return f"{path.relative_to(root)} has {found} rows, its marker says {rows}"
    return None


def remove_shard(root: Path, name: str, *, quarantine: bool) -> None:
    """Take shard ``name`` out of the store (marker first); keep its files under ``quarantine/``."""
    (root / "shards" / f"{name}.json").unlink(missing_ok=True)
    for table_name in TABLES:
        path = root / table_name / f"{name}.parquet"
        if not path.exists():
            continue
        if quarantine:
            target = root / "quarantine" / table_name
            target.mkdir(parents=True, exist_ok=True)
            os.replace(path, target / path.name)
        else:
            path.unlink()


class Trace:
    """A trace: the routing decisions a model made over prompts, in memory or on disk.

    The one interface every analysis takes (see the module docstring, "The trace protocol").
    Subclasses: :class:`moelens.tracer.Tracer` (recorded in memory) and :class:`StoredTrace` (a
    store on disk). A subclass provides :meth:`duckdb`, :meth:`table_names`, ``_load``,
    :attr:`layers`, :attr:`experts` and :attr:`special_token_ids`; :attr:`weights` defaults to
    ``True`` (a trace recorded in memory always holds weights).
    """

    def sql(self, query: str) -> pd.DataFrame:
        """Run ``query`` (DuckDB SQL over the views ``routes``, ``tokens``, ``prompts``[, ``logits``])."""
        return self.duckdb().sql(query).df()

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with one view per table (created on first call, then reused)."""
        raise NotImplementedError

    def table_names(self) -> list[str]:
        """The tables this trace holds, in :data:`TABLES` order (``logits`` only when recorded)."""
        raise NotImplementedError

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        """Every table of :meth:`table_names`, read into pandas now: {name: DataFrame}."""
        return {name: getattr(self, name) for name in self.table_names()}

    @property
    def layers(self) -> list[int]:
        """The MoE layer ids, in layer order (the model's numbering: dense layers are skipped)."""
        raise NotImplementedError

    @property
    def experts(self) -> int:
        """Routed experts per MoE layer: ``routes.expert`` lies in ``range(experts)``."""
        raise NotImplementedError

    @property
    def special_token_ids(self) -> list[int]:
        """The tokenizer's special token ids, sorted ([] when the trace does not know them)."""
        raise NotImplementedError

    @property
    def weights(self) -> bool:
        """Whether ``routes.weight`` holds the routing weights (``False``: expert ids only, a store
        imported from a serving engine; see :func:`require_weights`)."""
        return True

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name in TABLES:
            frame = self._load(name)
            self.__dict__[name] = frame  # cache: later access skips __getattr__
            return frame
        raise AttributeError(name)

    def _load(self, name: str) -> pd.DataFrame:
        raise NotImplementedError


class StoredTrace(Trace):
    """A :class:`Trace` kept in a store on disk (see :func:`scan_trace`): tables are read lazily."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards = finished_shards(self.root)
        self._connection: duckdb.DuckDBPyConnection | None = None

    def files(self, table: str) -> list[str]:
        """The Parquet files of ``table`` that belong to finished shards."""
        paths = [self.root / table / f"{name}.parquet" for name in self.shards]
        return [str(p) for p in paths if p.exists()]

    def table_names(self) -> list[str]:
        return [table for table in TABLES if self.files(table)]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.moe_layers)

    @property
    def experts(self) -> int:
        return self.manifest.layout.num_experts

    @property
    def special_token_ids(self) -> list[int]:
        return sorted(self.manifest.special_token_ids)

    @property
    def weights(self) -> bool:
        return self.manifest.weights

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        import duckdb

        if self._connection is None:
            connection = duckdb.connect()
            for table in TABLES:
                files = self.files(table)
                if files:
                    connection.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_sql_list(files)})")
            self._connection = connection
        return self._connection

    def sql(self, query: str) -> pd.DataFrame:
        import duckdb

        try:
            return super().sql(query)
        except duckdb.Error as error:
            self._raise_if_damaged(error)
            raise

    def _load(self, name: str) -> pd.DataFrame:
        import pyarrow.parquet as pq

        files = self.files(name)
        if not files:
            raise AttributeError(f"the store at {self.root} has no {name!r} table")
        try:
            table = pq.ParquetDataset(files).read()
        except Exception as error:  # pyarrow raises several types for truncated or garbled files
            self._raise_if_damaged(error)
            raise
        return widen_half_floats(table).to_pandas()

    def _raise_if_damaged(self, error: BaseException) -> None:
        """Turn a reader's error into one that names the damaged shards, if any shard is."""
        damaged = {name: problem for name in self.shards if (problem := verify_shard(self.root, name)) is not None}
        if damaged:
            first, problem = next(iter(damaged.items()))
            raise StoreError(
                f"{self.root}: {len(damaged)} finished shard(s) are damaged, e.g. {first}: {problem}. Rerun the "
                "same `moelens collect ... --resume` to repair the store: it moves damaged shards to quarantine/ "
                "and collects their prompts again."
            ) from error

    def __repr__(self) -> str:
        m = self.manifest
        return f"StoredTrace({str(self.root)!r}, model={m.model!r}, shards={len(self.shards)}, layers={m.moe_layers})"


def widen_half_floats(table: pa.Table) -> pa.Table:
    """Widen float16 columns to float32: DuckDB cannot scan Arrow float16 from memory, and pandas
    float16 columns overflow in everyday arithmetic (sums over many events)."""
    import pyarrow as pa

    def widened(kind: pa.DataType) -> pa.DataType:
        if kind == pa.float16():
            return pa.float32()
        if pa.types.is_fixed_size_list(kind) and kind.value_type == pa.float16():
            return pa.list_(pa.float32(), kind.list_size)
        return kind

    return table.cast(pa.schema([pa.field(f.name, widened(f.type)) for f in table.schema]))


def _sql_list(items: Sequence[str]) -> str:
    return "[" + ", ".join("'" + item.replace("'", "''") + "'" for item in items) + "]"


def scan_trace(root: str | os.PathLike[str]) -> StoredTrace:
    """Open the trace store at ``root`` lazily: only the manifest is read now; ``.sql()`` runs
    DuckDB over views of the Parquet files, a table attribute (``.routes``) or ``.to_pandas()``
    reads it into memory. Only finished shards are visible."""
    return StoredTrace(Path(root))


def read_trace(root: str | os.PathLike[str]) -> StoredTrace:
    """Alias of :func:`scan_trace`, kept for code written before it: it is just as lazy (nothing
    is read but the manifest until a table or query asks for it)."""
    return scan_trace(root)


def routes_table(layout: StoreLayout, columns: Mapping[str, np.ndarray | Sequence[Any]]) -> pa.Table:
    """Build a routes table with the declared schema from column arrays."""
    import pyarrow as pa

    return pa.Table.from_pydict(dict(columns), schema=layout.routes_schema())
