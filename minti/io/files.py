"""Files out, once each: atomic writes, JSON and CSV logs, why a torch file could not be read, and the one
grid of pictures that train.py's previews and sample.py's --grid lay out.
"""
import json
import os
import re
import uuid

import numpy as np


def atomic_write(path, write) -> None:
    """Call write(temp_path) on a temporary file beside `path`, then rename it over `path`.

    A crash, an exception, a signal or Ctrl-C while writing leaves the previous file untouched and no
    temporary file behind: os.replace is atomic when both names are in the same folder, and the bytes
    are flushed to disk (fsync) before the name points at them.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary open() would (some writers make 0600 files)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj, sort_keys=False) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str, sort_keys=sort_keys)
            f.write("\n")
    atomic_write(path, write)


def write_csv(path, columns, rows) -> None:
    """A CSV file with a header; floats with 6 significant digits."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(columns) + "\n")
            f.writelines(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n"
                         for row in rows)
    atomic_write(path, write)


def unreadable_torch_file(path, error) -> str:
    """Why torch.load(path, weights_only=True) failed, in words, from the file's first bytes and the error:
    Python objects it refused (the file could run code), a plain pickle, not a torch file at all, or a
    damaged one. Never torch's own advice to retry with weights_only=False."""
    with open(path, "rb") as f:
        head = f.read(4)
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return (f"{path} holds pickled Python objects ({found[1]}), not only tensors: refused, since "
                f"unpickling them could run any code the file's author put in it")
    if head[:2] == b"\x80" + bytes([2]) or head == b"PK\x03\x04":  # torch.save: legacy pickle or zip
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        detail = "" if "weights_only" in first else f" ({first})"
        return f"{path} is a damaged torch.save file{detail}: truncated or corrupt (an interrupted download?)"
    if head[:1] == b"\x80":
        return (f"{path} is a plain Python pickle, not a torch.save file: refused, since unpickling it could "
                f"run any code the file's author put in it")
    return f"{path} is not a PyTorch file at all (it starts with {head!r}): a wrong or damaged file"


def image_grid(images, rows):
    """uint8 numpy [B, H, W, 3] -> one uint8 image [rows * H, cols * W, 3], filled row by row."""
    b, h, w, c = images.shape
    cols = -(-b // rows)  # ceil
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid
