"""Local paths and s3:// URIs behind one small interface, with atomic writes.

S3 endpoint and credentials come from the standard AWS settings (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_PROFILE, ...). Local writes go to a temporary name in the same folder and
are renamed into place; S3 objects become visible only when their upload completes, and an upload
that fails is aborted, so readers never see half a file in either case.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _strip_file(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def storage_options(uri: str) -> dict[str, Any]:
    """The fsspec options for ``uri``'s filesystem: for S3 the endpoint from the AWS settings."""
    protocol = uri.split("://", 1)[0] if is_remote(uri) else "file"
    if protocol not in ("s3", "s3a"):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # other processes (Ray workers) write here: never answer from a stale listing cache
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if endpoint:
        kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return kwargs


def filesystem(uri: str) -> fsspec.AbstractFileSystem:
    protocol = uri.split("://", 1)[0] if is_remote(uri) else "file"
    return fsspec.filesystem("s3" if protocol == "s3a" else protocol, **storage_options(uri))


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(_strip_file(base), *names)


def _missing_message(uri: str, exc: BaseException) -> str:
    text = str(exc)
    if "bucket" in text.lower():
        return f"bucket of {uri} does not exist ({text}); check the bucket name and AWS_ENDPOINT_URL"
    return f"{uri} not found; check the path (and for s3:// the bucket and AWS_ENDPOINT_URL)"


def exists(uri: str) -> bool:
    return bool(filesystem(uri).exists(_strip_file(uri)))


def is_dir(uri: str) -> bool:
    return bool(filesystem(uri).isdir(_strip_file(uri)))


def listdir(uri: str) -> list[str]:
    """Base names in a folder ([] when it does not exist)."""
    fs = filesystem(uri)
    path = _strip_file(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def open_input(uri: str) -> IO[bytes]:
    """A seekable binary stream. FileNotFoundError names the path and the fix."""
    fs = filesystem(uri)
    try:
        return fs.open(_strip_file(uri), "rb")
    except FileNotFoundError as exc:
        raise FileNotFoundError(_missing_message(uri, exc)) from exc
    except IsADirectoryError as exc:
        raise FileNotFoundError(f"{uri} is a folder, expected a file") from exc


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_json(uri: str, fix: str = "write it again", shown: str | None = None) -> Any:
    """A JSON file that a stage wrote (a manifest, a claim, model metadata); a damaged one is an
    error naming it (as ``shown``, e.g. where a local copy came from) and ``fix``."""
    import json

    from rankformer.errors import InputError

    try:
        return json.loads(read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{shown or uri} is not JSON ({exc}): it is damaged or was cut short; {fix}"
        ) from None


@contextlib.contextmanager
def open_output_atomic(uri: str) -> Iterator[IO[bytes]]:
    """Write a file that appears whole at ``uri`` only if the block finishes without error."""
    if is_remote(uri):
        fs = filesystem(uri)
        f = fs.open(uri, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # abort the multipart upload: no object appears
                f.closed = True  # or its finaliser would try to flush the discarded buffer
            raise
        f.close()
        return
    path = _strip_file(uri)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared artifacts
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(uri: str, data: bytes) -> None:
    with open_output_atomic(uri) as f:
        f.write(data)


COPY_CHUNK = 8 << 20  # bytes per read: a copy holds this much, not the whole file


def copy(src: str, dst: str) -> None:
    """Stream ``src`` to ``dst`` (each local or s3://); ``dst`` appears whole or not at all."""
    with open_input(src) as fin, open_output_atomic(dst) as fout:
        shutil.copyfileobj(fin, fout, COPY_CHUNK)


def remove(uri: str) -> None:
    fs = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(_strip_file(uri))


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(_strip_file(uri), exist_ok=True)


def folder_claim(out: str, claim_file: str, what: str) -> tuple[dict[str, Any] | None, list[str]]:
    """What an output folder holds before a job claims it: the claim an earlier run of a job left
    there (``claim_file``; None for an empty or new folder) and the other names in it. A folder
    holding files but no claim belongs to someone else and is refused (``what``: the output kind,
    for the message)."""
    present = [n for n in listdir(out) if not n.startswith(".tmp-")]
    if not present:
        return None, []
    if claim_file not in present:
        from rankformer.errors import InputError

        raise InputError(
            f"output {out} is not empty and holds no rankformer {what} (found {present[:5]}); choose an "
            "empty or new --out folder"
        )
    claim = read_json(join(out, claim_file), "choose a new --out folder")
    return claim, [n for n in present if n != claim_file]


def write_claim(out: str, claim_file: str, doc: dict[str, Any]) -> None:
    """Claim folder ``out`` (created if need be) for a job: ``doc`` says which, with which options."""
    import json

    makedirs(out)
    write_bytes_atomic(join(out, claim_file), json.dumps(doc, indent=1, sort_keys=True).encode())
