"""Reading untrusted adapter folders: bounded, never following a link out of the folder, never blocking.

Everything an adapter folder holds is untrusted input. `UntrustedFolder.read` returns a file's bytes only
when the file is a regular file inside the folder (or, for a link, inside one of the allowed roots: the
huggingface_hub cache keeps a snapshot's files as links into the repo's ``blobs`` folder), opened without
following a further link and without blocking (a FIFO opens at once and is then refused by ``fstat``),
and no larger than the caller's bound. `parse_json` bounds the nesting depth before parsing and refuses
duplicate keys and NaN/Infinity; `parse_safetensors_header` checks a safetensors header against the
file's length before any tensor is built. Nothing here unpickles, imports or executes anything.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError, UnsafeAdapterError

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_FOLDER_ENTRIES = 10_000
MAX_SAFETENSORS_HEADER = 16 << 20
MAX_TENSOR_DIMS = 8

# safetensors dtype name -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


class UntrustedFolder:
    """A folder whose files are read with `read` only. ``extra_roots``: other folders that links in it may
    point into (for a huggingface_hub snapshot: the repo's ``blobs`` folder)."""

    def __init__(self, path: str | os.PathLike, extra_roots: tuple[str | os.PathLike, ...] = ()):
        self.path = Path(path)
        try:
            self.real = self.path.resolve(strict=True)
        except FileNotFoundError:
            raise AdapterFormatError(f"adapter folder {self.path} does not exist; check the path") from None
        except (OSError, RuntimeError) as exc:
            raise AdapterFormatError(f"adapter folder {self.path} cannot be opened ({exc}); check the path") from None
        if not self.real.is_dir():
            raise AdapterFormatError(f"{self.path} is not a folder; pass the folder that holds the adapter files")
        self.roots = [self.real] + [Path(r).resolve() for r in extra_roots]

    def names(self) -> set[str]:
        """The names of the folder's entries (at most MAX_FOLDER_ENTRIES)."""
        out: set[str] = set()
        try:
            with os.scandir(self.real) as entries:
                for entry in entries:
                    out.add(entry.name)
                    if len(out) > MAX_FOLDER_ENTRIES:
                        raise AdapterFormatError(
                            f"{self.path} holds more than {MAX_FOLDER_ENTRIES} entries; an adapter folder holds a "
                            "few files: pass the adapter's own folder"
                        )
        except OSError as exc:
            raise AdapterFormatError(f"adapter folder {self.path} cannot be listed ({exc})") from None
        return out

    def is_file(self, name: str) -> bool:
        """Whether ``name`` exists as an entry that is not a folder (a link counts; `read` checks it)."""
        try:
            st = os.lstat(self.real / name)
        except OSError:
            return False
        return not stat.S_ISDIR(st.st_mode)

    def read_prefix(self, name: str, count: int) -> bytes:
        """The first ``count`` bytes (or fewer) of the regular file ``name``, with the checks of `read`."""
        return self.read(name, max_bytes=None, prefix=count)

    def read(self, name: str, max_bytes: int | None, prefix: int | None = None) -> bytes:
        """The bytes of the regular file ``name``. Refuses (UnsafeAdapterError) a link leading out of the
        allowed roots, a FIFO, socket or device; refuses (AdapterFormatError) a file over ``max_bytes``."""
        shown = self.path / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UnsafeAdapterError(f"{name!r} is not a plain file name inside {self.path}")
        path = self.real / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise AdapterFormatError(f"{shown} does not exist") from None
        except OSError as exc:
            raise AdapterFormatError(f"{shown} cannot be read ({exc})") from None
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if not _inside(target, self.roots):
                raise UnsafeAdapterError(
                    f"{shown} is a link to {target}, outside the adapter folder; unilora_hf reads adapter files "
                    "only from inside their folder. Copy the file into the folder if you trust it."
                )
            path = target
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise UnsafeAdapterError(f"{shown} cannot be opened as a plain file ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                        or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
                raise UnsafeAdapterError(f"{shown} is {kind}, not a regular file; an adapter file must be a plain file")
            if prefix is not None:
                return os.read(fd, prefix)
            if st.st_size > max_bytes:
                raise AdapterFormatError(
                    f"{shown} is {st.st_size:,} bytes, more than the {max_bytes:,} such a file can need; it is not "
                    "an adapter file of the kind its name says"
                )
            chunks, total = [], 0
            while True:
                chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise AdapterFormatError(f"{shown} grew beyond {max_bytes:,} bytes while being read")
            return b"".join(chunks)
        finally:
            os.close(fd)


def read_safetensors_head(folder: "UntrustedFolder", name: str) -> dict:
    """The header (JSON) of the safetensors file ``name`` in ``folder``, read without its tensors."""
    data = folder.read_prefix(name, MAX_SAFETENSORS_HEADER + 8)
    if len(data) < 8:
        raise AdapterFormatError(f"{folder.path / name} is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > len(data):
        raise AdapterFormatError(f"{folder.path / name} has a header length that does not fit; it is corrupt")
    header = parse_json(data[8 : 8 + n], f"the header of {folder.path / name}", max_depth=4)
    if not isinstance(header, dict):
        raise AdapterFormatError(f"the header of {folder.path / name} is not a JSON object")
    return header


def _json_depth_ok(text: str, limit: int) -> bool:
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from untrusted bytes: UTF-8, nesting at most ``max_depth``, no duplicate keys, no NaN/Infinity."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); it is corrupt") from None
    if not _json_depth_ok(text, max_depth):
        raise AdapterFormatError(f"{where} nests deeper than {max_depth} levels; no adapter file does: it is corrupt or hostile")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{where} is not valid JSON ({' '.join(str(exc).split())[:200]}); re-download or re-save it") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it (checked against the file length)."""

    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, SAFETENSORS_DTYPES[self.dtype][0])

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def parse_safetensors_header(data: bytes, where: str) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """(tensors by name, the ``__metadata__`` strings, the offset of the data section) of safetensors ``data``,
    after checking every entry: known dtype, at most MAX_TENSOR_DIMS non-negative dimensions, byte range of
    exactly numel·itemsize, ranges contiguous from 0 and ending at the end of the file."""
    if len(data) < 8:
        raise AdapterFormatError(f"{where} is {len(data)} bytes long, too short for a safetensors file; it is truncated")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > len(data):
        raise AdapterFormatError(f"{where} has a header length of {n:,} bytes that does not fit the file; it is truncated "
                                 "or corrupt: download or save the adapter again")
    header = parse_json(data[8 : 8 + n], f"the header of {where}", max_depth=4)
    if not isinstance(header, dict):
        raise AdapterFormatError(f"the header of {where} is not a JSON object; it is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterFormatError(f"the metadata of {where} is not a map of strings; it is corrupt")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        bad = AdapterFormatError(f"the header entry {name[:100]!r} of {where} is malformed; the file is corrupt")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES or not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
            raise bad
        if not all(type(s) is int and 0 <= s < 1 << 40 for s in shape):
            raise bad
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad
        entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
        if entry.begin < 0 or entry.end - entry.begin != entry.numel * SAFETENSORS_DTYPES[dtype][1]:
            raise bad
        entries[name] = entry
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise AdapterFormatError(f"the tensors of {where} overlap or leave gaps; the file is corrupt")
        position = entry.end
    if 8 + n + position != len(data):
        raise AdapterFormatError(
            f"{where} is {len(data):,} bytes but its header describes {8 + n + position:,}; it is truncated or corrupt: "
            "download or save the adapter again"
        )
    return entries, meta, 8 + n


def tensor_bytes(data: bytes, entry: TensorEntry, data_start: int) -> memoryview:
    return memoryview(data)[data_start + entry.begin : data_start + entry.end]


def build_tensor(data: bytes, entry: TensorEntry, data_start: int):
    """The tensor of ``entry`` as a new (owned, writable) torch tensor in the file's dtype (safetensors stores
    little-endian values, as every platform torch supports does)."""
    import torch

    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    raw = bytearray(tensor_bytes(data, entry, data_start))
    return torch.frombuffer(raw, dtype=entry.torch_dtype).reshape(entry.shape)
