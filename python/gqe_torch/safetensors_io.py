"""A small reader and writer of the safetensors format, as docs/checkpoints.md describes it.

Layout: 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets"}, optional "__metadata__": {str: str}}, then the row-major data. Offsets are
relative to the end of the header. The reader refuses anything malformed with a BadInput that
names the file and the tensor; the writer replaces the file atomically.
"""

import json
import math
import os
import struct

import numpy as np
import torch

from . import strict_json
from .errors import BadInput

MAX_HEADER_BYTES = 100_000_000
MAX_RANK = 64  # dimensions of a shape the header may give (gqe's models use at most 2)

# dtype name -> (numpy dtype of the stored little-endian words, torch dtype of the values)
DTYPES = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),  # numpy has no bfloat16: raw 16-bit words
    "I32": (np.dtype("<i4"), torch.int32),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_DTYPE_OF_TORCH = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class TensorEntry:
    """One tensor of a file's header: name, dtype name, shape, [begin, end) in the data."""

    def __init__(self, name, dtype, shape, begin, end):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


def parse_header(blob, source):
    """Checks a whole file's bytes; returns (entries in file order, metadata, data offset)."""
    if len(blob) < 8:
        raise BadInput(f"{source} is {len(blob)} bytes long; expected at least 8 (the header length)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES:
        raise BadInput(f"{source}: header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
    if 8 + header_len > len(blob):
        raise BadInput(f"{source}: header length {header_len} runs past the end of the file ({len(blob) - 8} bytes)")
    try:
        header = strict_json.loads(bytes(blob[8:8 + header_len]).decode("utf-8"))
    except BadInput as e:
        raise BadInput(f"{source}: header: {e}") from None
    except (UnicodeDecodeError, ValueError):
        raise BadInput(f"{source}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadInput(f"{source}: the header is JSON but not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null: no metadata, as the format's own reader takes it
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(f"{source}: __metadata__ is not an object of strings")

    data_size = len(blob) - 8 - header_len
    entries = []
    for name, info in header.items():
        what = f"{source}: tensor {name!r}"
        # Other fields are ignored, as by gqe and by the format's own reader.
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise BadInput(f"{what} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise BadInput(f"{what} has dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise BadInput(f"{what} has shape {shape!r}; expected an array of non-negative integers")
        if len(shape) > MAX_RANK:
            raise BadInput(f"{what} has a shape of more than {MAX_RANK} dimensions")
        elements = 1
        for s in shape:  # as gqe: each dimension an int64, their running product a uint64
            if s >= 1 << 63 or elements * s >= 1 << 64:
                raise BadInput(f"{what} has a shape whose element count overflows (dimension {s})")
            elements *= s
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise BadInput(f"{what} has data_offsets {offsets!r}; expected [begin, end]")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise BadInput(f"{what} has data_offsets [{begin}, {end}] outside the {data_size} data bytes")
        nbytes = math.prod(shape) * DTYPES[dtype][0].itemsize  # exact: no int64 overflow
        if end - begin != nbytes:
            raise BadInput(f"{what} has shape {shape} of {dtype} ({nbytes} bytes) but {end - begin} data bytes")
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))

    # The tensors must tile the data exactly: no overlap, no gap, nothing left over.
    covered = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < covered:
            raise BadInput(f"{source}: tensor {e.name!r} overlaps another tensor's bytes")
        if e.begin > covered:
            raise BadInput(f"{source}: bytes {covered} to {e.begin} belong to no tensor")
        covered = e.end
    if covered != data_size:
        raise BadInput(f"{source}: the tensors cover {covered} of the {data_size} data bytes; expected all of them")
    return entries, metadata, 8 + header_len


def read_file_bytes(path, max_bytes=None, expected="a file"):
    """The file's bytes; a file longer than max_bytes is refused before it is read, as in gqe."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise BadInput(f"{path} is {size} bytes long; expected {expected} of at most {max_bytes}")
            return f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None


def read_safetensors(path):
    """Returns ({name: torch tensor in its stored dtype}, {name: dtype name}, metadata)."""
    blob = read_file_bytes(path)
    entries, metadata, start = parse_header(blob, path)
    tensors, dtypes = {}, {}
    for e in entries:
        np_dtype, torch_dtype = DTYPES[e.dtype]
        try:
            words = np.frombuffer(blob, dtype=np_dtype, count=(e.end - e.begin) // np_dtype.itemsize,
                                  offset=start + e.begin).reshape(e.shape)
        except ValueError:  # NumPy's own limits: 32 dimensions, sizes within its index type
            raise BadInput(f"{path}: tensor {e.name!r} of shape {list(e.shape)} cannot be held by NumPy") from None
        t = torch.from_numpy(words.astype(np_dtype.newbyteorder("="), copy=True))
        if e.dtype == "BF16":
            t = t.view(torch.bfloat16)  # the raw words are BF16 values
        tensors[e.name] = t
        dtypes[e.name] = e.dtype
    return tensors, dtypes, metadata


def encode(tensor, dtype):
    """A tensor's bytes in the given storage dtype (rounded to nearest even by torch's cast)."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}")
    t = tensor.detach().to("cpu").contiguous()
    if dtype == "I32":
        if t.is_floating_point():
            raise ValueError("I32 needs integer values")
        if t.numel() and (int(t.min()) < -2 ** 31 or int(t.max()) >= 2 ** 31):
            raise ValueError("value out of int32 range")
        return t.to(torch.int32).numpy().astype("<i4").tobytes()
    t = t.to(DTYPES[dtype][1])
    if dtype == "BF16":
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(DTYPES[dtype][0]).tobytes()


def serialize(tensors, dtypes, metadata=None):
    """The bytes of a safetensors file holding `tensors` (in dict order) in `dtypes`."""
    header = {"__metadata__": {"format": "pt", **(metadata or {})}}
    chunks, offset = [], 0
    for name, t in tensors.items():
        data = encode(t, dtypes[name])
        header[name] = {"dtype": dtypes[name], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 64)  # the data starts on a 64-byte boundary, as gqe writes it
    return b"".join([struct.pack("<Q", len(text)), text] + chunks)


def write_atomically(path, data):
    """Writes bytes to a temporary file beside `path`, flushes it to disk, then renames it over
    `path`: a reader sees the old file or the whole new one, never a part. As gqe's writer: a
    symbolic link keeps its place while the file it names is replaced, and a device, FIFO or socket
    at the path is written through, never replaced."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        try:
            with open(path, "wb") as f:
                f.write(data)
            return
        except OSError as e:
            raise BadInput(f"cannot write {path}: {e.strerror}") from None
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # an interrupt too: no temporary file is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BadInput(f"cannot write {path}: {e.strerror}") from None
        raise


def write_safetensors(path, tensors, dtypes=None, metadata=None):
    """Writes tensors atomically; dtypes defaults to each tensor's own (float32 -> F32, ...)."""
    dtypes = dict(dtypes or {})
    for name, t in tensors.items():
        if name not in dtypes:
            if t.dtype not in _DTYPE_OF_TORCH:
                raise ValueError(f"tensor {name!r}: no safetensors dtype for {t.dtype}")
            dtypes[name] = _DTYPE_OF_TORCH[t.dtype]
    write_atomically(path, serialize(tensors, dtypes, metadata))
