"""Real datasets a user can fetch: ``transresnet data download flickr8k|personality-captions --out DIR``.

- ``flickr8k``: the widely mirrored archives ``Flickr8k_Dataset.zip`` (photos) and ``Flickr8k_text.zip``
  (``Flickr8k.token.txt`` and the split lists). ``DIR`` gets ``captions.csv`` (``image,split,caption``;
  ``Flickr_8k.trainImages.txt`` / ``devImages.txt`` / ``testImages.txt`` give train / val / test) and the
  photos in ``images/``, the CSV layout the readers take.
- ``personality-captions``: ParlAI's ``personality_captions.tgz`` (``train.json``, ``val.json``, ``test.json``,
  ``personalities.txt``) into ``DIR``, then every YFCC100M photo named by an ``image_hash`` into
  ``DIR/images/<hash>.jpg`` from a base URL. A photo that fails to download is counted, listed in
  ``DIR/failed_images.txt`` and skipped; a rerun fetches only the photos still missing.

Every file streams into a temporary ``.part`` file, is checked against its size (the server's
``Content-Length``, and the known size where there is one) and its sha256 where known, and is renamed
into place. Archives are extracted into a staging folder beside ``DIR`` and moved in when complete, so
a reader never sees half a dataset. Nothing here touches the network at import.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from transresnet.files import sha256_file
from transresnet.progress import progress

logger = logging.getLogger(__name__)

FLICKR8K_IMAGES_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
FLICKR8K_TEXT_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip"
PERSONALITY_CAPTIONS_URL = "http://parl.ai/downloads/personality_captions/personality_captions.tgz"
PERSONALITY_CAPTIONS_SHA256 = "e0979d3ac0854395ee74f2c61a6bc467838cc292c3a9a62e891d8230d3a01365"  # ParlAI's build.py
YFCC_BASE_URL = "https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images"
"""Photo ``h`` is at ``{base}/{h[:3]}/{h[3:6]}/{h}.jpg`` (ParlAI's download_images.py)."""

FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
FLICKR8K_TOKENS = "Flickr8k.token.txt"
PC_FILES = ("train.json", "val.json", "test.json", "personalities.txt")
FAILED_LIST = "failed_images.txt"
CHUNK = 1 << 16
USER_AGENT = "transresnet-data-download"


@dataclass(frozen=True)
class Remote:
    """A file to fetch: where from, and what it must be (``None`` = not known)."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(urllib.request.urlparse(self.url).path).name or "download"


@dataclass(frozen=True)
class DatasetSource:
    """One named dataset: its archives (by key, overridable with ``--url KEY=URL``) and its photo base URL."""

    name: str
    archives: dict[str, Remote]
    base_url: str | None = None
    description: str = ""


DATASETS: dict[str, DatasetSource] = {
    "flickr8k": DatasetSource(
        "flickr8k", {"images": Remote(FLICKR8K_IMAGES_URL), "text": Remote(FLICKR8K_TEXT_URL)},
        description="8,091 Flickr photos with 5 captions each (about 1.1 GB)"),
    "personality-captions": DatasetSource(
        "personality-captions", {"archive": Remote(PERSONALITY_CAPTIONS_URL, PERSONALITY_CAPTIONS_SHA256)},
        base_url=YFCC_BASE_URL,
        description="ParlAI's Personality-Captions JSON, then about 200k YFCC100M photos one by one"),
}


@dataclass
class PhotoReport:
    """What the photo step of a download did."""

    fetched: int = 0
    present: int = 0  # already there from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # image hash -> reason


# --------------------------------------------------------------------------------------------------
# Fetching one file
# --------------------------------------------------------------------------------------------------


def fetch(remote: Remote, target: Path, *, timeout: float = 60.0, show_progress: bool | None = None) -> Path:
    """Stream ``remote`` into ``target`` through ``target.part``; check size and sha256; rename into place.

    Raises ``OSError`` with one line naming the URL when the server cannot be reached or answers an error,
    ``ValueError`` when the bytes are not what they must be.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.part")
    digest = hashlib.sha256()
    try:
        with _open(remote.url, timeout) as response:
            declared = _content_length(response)
            expected = remote.size if remote.size is not None else declared
            done = _stream(response, part, digest, expected, remote.name, show_progress)
    except (http.client.HTTPException, TimeoutError) as err:
        part.unlink(missing_ok=True)
        raise OSError(f"download of {remote.url} was cut off ({type(err).__name__}: {err}); rerun to fetch it "
                      "again") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    try:
        _check(remote, done, declared, digest.hexdigest())
    except ValueError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return target


def _open(url: str, timeout: float) -> Any:
    """The response of ``url`` (an ``http.client.HTTPResponse``, or a file-like object for ``file://``)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise OSError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise OSError(f"cannot download {url}: {err.reason} (offline? pass a reachable mirror with --url, or "
                      "fetch the file by hand)") from err
    except TimeoutError as err:
        raise OSError(f"cannot download {url}: no answer within {timeout:g}s") from err


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream(response: Any, part: Path, digest: Any, total: int | None, name: str, show_progress: bool | None) -> int:
    done = 0
    with part.open("wb") as handle, progress(total, f"downloading {name}", "B", enabled=show_progress) as bar:
        while block := response.read(CHUNK):
            handle.write(block)
            digest.update(block)
            done += len(block)
            bar.update(len(block))
    return done


def _check(remote: Remote, size: int, declared: int | None, sha256: str) -> None:
    for what, expected in (("the server's Content-Length", declared), ("the known size", remote.size)):
        if expected is not None and size != expected:
            raise ValueError(f"download of {remote.url} is {size} bytes, not the {expected} of {what} (cut off? "
                             "rerun to fetch it again)")
    if remote.sha256 is not None and sha256 != remote.sha256:
        raise ValueError(f"download of {remote.url} has sha256 {sha256}, not the known {remote.sha256} "
                         "(a changed or corrupt file; check the mirror)")


def fetch_archive(remote: Remote, downloads: Path, *, timeout: float = 60.0) -> Path:
    """``remote`` in the ``downloads`` folder, fetched unless a checked copy from an earlier run is there."""
    target = downloads / remote.name  # only ever renamed into place after its checks passed
    if target.is_file() and (remote.sha256 is None or sha256_file(target) == remote.sha256):
        logger.info("using %s from an earlier download", target)
        return target
    logger.info("downloading %s", remote.url)
    try:
        return fetch(remote, target, timeout=timeout)
    except BaseException:
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()  # leave no empty folder behind a failed first download
        raise


# --------------------------------------------------------------------------------------------------
# Extracting and publishing
# --------------------------------------------------------------------------------------------------


def extract(archive: Path, into: Path) -> None:
    """Extract a zip or tar archive into ``into``; members that would land outside it are refused."""
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for member in handle.namelist():
                _inside(root, member, archive)
            handle.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            for member in members:
                _inside(root, member.name, archive)
                if member.issym() or member.islnk() or member.isdev():
                    raise ValueError(f"{archive} holds a link or device ({member.name}); refusing to extract it")
            handle.extractall(into, members=members)
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive (a download error page? delete it and rerun)")


def _inside(root: Path, member: str, archive: Path) -> None:
    path = (root / member).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{archive} has a member outside its folder ({member!r}); refusing to extract it")


def staging_dir(out: Path, label: str) -> Path:
    """An empty staging folder beside ``out`` (same file system, so the final renames are atomic)."""
    staging = out.parent / f".{out.name}.{label}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Move ``names`` from ``staging`` into ``out`` in order (an existing one is replaced whole)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, target = staging / name, out / name
        if target.is_dir() and not target.is_symlink():
            old = out / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


def _find(folder: Path, name: str) -> Path:
    """The one file called ``name`` anywhere under ``folder`` (archives differ in their top folder)."""
    hits = [p for p in folder.rglob(name) if p.is_file() and "__MACOSX" not in p.parts]
    if not hits:
        raise ValueError(f"the archive has no {name}; is it the right archive? (extracted into {folder})")
    return min(hits, key=lambda p: len(p.parts))


# --------------------------------------------------------------------------------------------------
# Flickr8k
# --------------------------------------------------------------------------------------------------


def download_flickr8k(out: str | Path, *, urls: dict[str, str] | None = None, timeout: float = 60.0) -> Path:
    """Fetch and lay out Flickr8k in ``out`` (``captions.csv`` and ``images/``); return the CSV path.

    A folder that already has ``captions.csv`` is left alone (delete it to download again).
    """
    out = Path(out)
    if (out / "captions.csv").is_file():
        logger.info("%s already holds captions.csv; nothing to download", out)
        return out / "captions.csv"
    remotes = _remotes(DATASETS["flickr8k"], urls)
    downloads = out.parent / f".{out.name}.downloads"
    archives = {key: fetch_archive(remote, downloads, timeout=timeout) for key, remote in remotes.items()}
    staging = staging_dir(out, "flickr8k")
    extract(archives["text"], staging / "text")
    extract(archives["images"], staging / "photos")
    photos = _gather_photos(staging / "photos", staging / "images")
    rows = flickr8k_rows(staging / "text", set(photos))
    _write_csv(staging / "captions.csv", ["image", "split", "caption"], rows)
    publish(staging, out, ["images", "captions.csv"])
    shutil.rmtree(downloads, ignore_errors=True)
    logger.info("wrote %d captions of %d photos to %s", len(rows), len({r[0] for r in rows}), out / "captions.csv")
    return out / "captions.csv"


def _gather_photos(extracted: Path, images: Path) -> list[str]:
    """Move every photo of the extracted archive (whatever its top folder) into ``images``."""
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(extracted.rglob("*")):
        if (path.is_file() and path.suffix.lower() in (".jpg", ".jpeg") and "__MACOSX" not in path.parts
                and not path.name.startswith("._")):
            if (images / path.name).exists():
                raise ValueError(f"the photo archive holds {path.name} twice")
            os.replace(path, images / path.name)
            names.append(path.name)
    if not names:
        raise ValueError("the photo archive holds no .jpg files; is it Flickr8k_Dataset.zip?")
    return names


def flickr8k_rows(text: Path, photos: set[str]) -> list[list[str]]:
    """``image,split,caption`` rows from Flickr8k.token.txt and the split lists, for photos present.

    Captions of photos in no split list, or not in the photo archive, are left out (and counted).
    """
    splits: dict[str, str] = {}
    for split, name in FLICKR8K_SPLIT_FILES.items():
        for line in _find(text, name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                splits[line.strip()] = split
    rows, unsplit, missing = [], 0, 0
    for number, line in enumerate(_find(text, FLICKR8K_TOKENS).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, caption = line.partition("\t")
        image = key.rsplit("#", 1)[0].strip()
        if not caption.strip() or not image:
            raise ValueError(f"{FLICKR8K_TOKENS} line {number} is not 'IMAGE#N<tab>CAPTION': {line[:80]!r}")
        if image not in splits:
            unsplit += 1
        elif image not in photos:
            missing += 1
        else:
            rows.append([image, splits[image], caption.strip()])
    if unsplit or missing:
        logger.info("left out %d caption(s) of photos in no split list and %d of photos not in the archive",
                    unsplit, missing)
    if not rows:
        raise ValueError("no caption of Flickr8k.token.txt names a photo of the archive in a split list")
    return rows


# --------------------------------------------------------------------------------------------------
# Personality-Captions
# --------------------------------------------------------------------------------------------------


def download_personality_captions(out: str | Path, *, urls: dict[str, str] | None = None,
                                  base_url: str | None = None, timeout: float = 30.0, workers: int = 8,
                                  limit: int | None = None) -> PhotoReport:
    """Fetch ParlAI's Personality-Captions JSON into ``out``, then its YFCC100M photos into ``out/images``.

    Resumable: JSON already there is kept and photos already there are not fetched again. Photos that
    fail are listed in ``out/failed_images.txt`` (hash and reason) and skipped. ``limit``: fetch at most
    this many of the missing photos (None = all).
    """
    out = Path(out)
    source = DATASETS["personality-captions"]
    if not all((out / name).is_file() for name in PC_FILES):
        _personality_captions_text(out, _remotes(source, urls)["archive"], timeout)
    else:
        logger.info("%s already holds the Personality-Captions JSON; fetching missing photos only", out)
    hashes = personality_caption_hashes(out)
    report = fetch_photos(hashes, out / "images", (base_url or source.base_url or "").rstrip("/"),
                          timeout=timeout, workers=workers, limit=limit)
    _write_failed(out / FAILED_LIST, report.failed)
    logger.info("photos: %d fetched, %d already there, %d failed%s", report.fetched, report.present,
                len(report.failed), f" (listed in {out / FAILED_LIST})" if report.failed else "")
    return report


def _personality_captions_text(out: Path, remote: Remote, timeout: float) -> None:
    downloads = out.parent / f".{out.name}.downloads"
    archive = fetch_archive(remote, downloads, timeout=timeout)
    staging = staging_dir(out, "personality-captions")
    extract(archive, staging / "extracted")
    for name in PC_FILES:
        os.replace(_find(staging / "extracted", name), staging / name)
    for name in PC_FILES[:3]:
        if not isinstance(json.loads((staging / name).read_text(encoding="utf-8")), list):
            raise ValueError(f"{name} of {remote.url} is not a list of records; is it ParlAI's archive?")
    shutil.rmtree(staging / "extracted")
    publish(staging, out, ["personalities.txt", *PC_FILES[:3]])
    shutil.rmtree(downloads, ignore_errors=True)


def personality_caption_hashes(folder: Path) -> list[str]:
    """Distinct image hashes of train/val/test.json in first-seen order."""
    hashes: dict[str, None] = {}
    for name in PC_FILES[:3]:
        for record in json.loads((folder / name).read_text(encoding="utf-8")):
            value = record.get("image_hash") if isinstance(record, dict) else None
            if isinstance(value, str) and value.strip():
                hashes.setdefault(value.strip(), None)
    return list(hashes)


def photo_url(base_url: str, image_hash: str) -> str:
    """Where YFCC100M keeps the photo ``image_hash`` under ``base_url``."""
    return f"{base_url}/{image_hash[:3]}/{image_hash[3:6]}/{image_hash}.jpg"


def fetch_photos(hashes: Iterable[str], images: Path, base_url: str, *, timeout: float = 30.0, workers: int = 8,
                 limit: int | None = None) -> PhotoReport:
    """Fetch ``images/<hash>.jpg`` for every hash not there yet, ``workers`` at a time; failures are reported."""
    if not base_url:
        raise ValueError("no base URL for the photos; pass --base-url")
    images.mkdir(parents=True, exist_ok=True)
    report = PhotoReport()
    missing = []
    for image_hash in hashes:
        if (images / f"{image_hash}.jpg").is_file():
            report.present += 1
        else:
            missing.append(image_hash)
    missing = missing[:limit] if limit is not None else missing
    if not missing:
        return report
    fetch_one = _photo_fetcher(images, base_url, timeout)
    with ThreadPoolExecutor(max(1, workers)) as pool, progress(len(missing), "downloading photos", "photos") as bar:
        for image_hash, size, error in pool.map(fetch_one, missing):
            if error is None:
                report.fetched += 1
                bar.set_postfix(MB=f"{size / 1e6:.1f}")
            else:
                report.failed[image_hash] = error
            bar.update(1)
    return report


def _photo_fetcher(images: Path, base_url: str, timeout: float) -> Callable[[str], tuple[str, int, str | None]]:
    def fetch_one(image_hash: str) -> tuple[str, int, str | None]:
        target = images / f"{image_hash}.jpg"
        try:
            fetch(Remote(photo_url(base_url, image_hash)), target, timeout=timeout, show_progress=False)
            return image_hash, target.stat().st_size, None
        except (OSError, ValueError) as err:
            return image_hash, 0, " ".join(str(err).split())
    return fetch_one


def _write_failed(path: Path, failed: dict[str, str]) -> None:
    """The failures of this run, one ``hash<tab>reason`` a line (removed when none failed)."""
    if not failed:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{h}\t{reason}\n" for h, reason in sorted(failed.items())), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------


def _remotes(source: DatasetSource, urls: dict[str, str] | None) -> dict[str, Remote]:
    """The dataset's archives with ``urls`` overriding some (a replaced URL keeps no known checksum)."""
    urls = dict(urls or {})
    unknown = sorted(set(urls) - set(source.archives))
    if unknown:
        raise ValueError(f"{source.name} has no archive called {', '.join(unknown)}; its archives: "
                         f"{', '.join(source.archives)} (--url KEY=URL)")
    return {key: Remote(urls[key]) if key in urls and urls[key] != remote.url else remote
            for key, remote in source.archives.items()}


def _write_csv(path: Path, header: list[str], rows: Iterable[Sequence[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def parse_urls(values: Sequence[str], source: DatasetSource) -> dict[str, str]:
    """``--url`` values: ``KEY=URL``, or a bare URL when the dataset has a single archive."""
    urls = {}
    for value in values:
        key, sep, url = value.partition("=")
        if sep and key in source.archives:
            urls[key] = url
        elif len(source.archives) == 1:
            urls[next(iter(source.archives))] = value
        else:
            raise ValueError(f"--url {value!r}: {source.name} has several archives; write KEY=URL with KEY one of "
                             f"{', '.join(source.archives)}")
    return urls


def download(name: str, out: str | Path, *, urls: Sequence[str] = (), base_url: str | None = None,
             timeout: float = 60.0, workers: int = 8, limit: int | None = None) -> Path:
    """``transresnet data download NAME``: the dataset's main file in ``out`` once it is there."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    source = DATASETS[name]
    overrides = parse_urls(urls, source)
    if name == "flickr8k":
        if base_url:
            raise ValueError("--base-url only applies to personality-captions (its photos)")
        return download_flickr8k(out, urls=overrides, timeout=timeout)
    download_personality_captions(out, urls=overrides, base_url=base_url, timeout=timeout, workers=workers,
                                  limit=limit)
    return Path(out) / "train.json"
