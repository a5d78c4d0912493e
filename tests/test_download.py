"""``transresnet data download``: small archives of the real layouts served from 127.0.0.1, never the network."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, image_bytes
from transresnet.cli import main
from transresnet.data import load_dataset
from transresnet.download import Remote, download, extract, fetch, photo_url

TRAIN = [f"10{i:02d}_flickr.jpg" for i in range(6)]
DEV = ["2000_dev.jpg", "2001_dev.jpg"]
TEST = ["3000_test.jpg", "3001_test.jpg"]
UNSPLIT = "4000_nosplit.jpg"  # in the photo archive and the token file, in no split list (as in Flickr8k)


class _Server:
    """A folder served over HTTP on 127.0.0.1 in a thread; records the paths asked for; some paths lie."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.short = root, [], set()  # short: paths answered with half their bytes
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                if self.path in server.short:
                    body = (root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "www"
    root.mkdir()
    with _Server(root) as running:
        yield running


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as handle:
        for name, data in files.items():
            handle.writestr(name, data)
    return path


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as handle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return path


def _flickr8k_archives(root: Path) -> tuple[str, str]:
    """Flickr8k_Dataset.zip (Flicker8k_Dataset/ with the mac resource forks) and Flickr8k_text.zip."""
    photos = [*TRAIN, *DEV, *TEST, UNSPLIT]
    images = {f"Flicker8k_Dataset/{name}": image_bytes(seed=i) for i, name in enumerate(photos)}
    images.update({f"__MACOSX/Flicker8k_Dataset/._{name}": b"\0\5\26\7" for name in photos[:2]})
    tokens = [f"{name}#{k}\tA photo number {i} , caption {k} ." for i, name in enumerate(photos) for k in range(5)]
    tokens.append("2258277193_586949ec62.jpg.1#0\tA caption of a photo that is not in the archive .")
    text = {"Flickr8k.token.txt": "\n".join(tokens) + "\n",
            "Flickr_8k.trainImages.txt": "\n".join(TRAIN) + "\n",
            "Flickr_8k.devImages.txt": "\n".join(DEV) + "\n",
            "Flickr_8k.testImages.txt": "\n".join([*TEST, "2258277193_586949ec62.jpg.1"]) + "\n",
            "readme.txt": "Flickr8k text"}
    _zip(root / "Flickr8k_Dataset.zip", images)
    _zip(root / "Flickr8k_text.zip", {k: v.encode() for k, v in text.items()})
    return "Flickr8k_Dataset.zip", "Flickr8k_text.zip"


def _flickr_urls(server: _Server) -> list[str]:
    images, text = _flickr8k_archives(server.root)
    return [f"images={server.url}/{images}", f"text={server.url}/{text}"]


def test_flickr8k_download_loads_and_trains(server: _Server, tmp_path: Path, tiny_text_model: Path) -> None:
    out = tmp_path / "flickr8k"
    csv_path = download("flickr8k", out, urls=_flickr_urls(server))
    assert csv_path == out / "captions.csv"
    ds = load_dataset(csv_path)
    assert ds.skipped.total == 0
    assert {s: len({r.image_id for r in ds.records if r.split == s}) for s in ("train", "val", "test")} == {
        "train": 6, "val": 2, "test": 2}
    assert len(ds) == 10 * 5 and UNSPLIT not in ds.image_ids()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([*TRAIN, *DEV, *TEST, UNSPLIT])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flickr8k", "www"]  # no staging or download left

    from tests.helpers import tiny_tree
    from transresnet.checkpoint import load_checkpoint
    from transresnet.config import build_config
    from transresnet.train import train

    config = build_config(tiny_tree(tiny_text_model, model={"personality": {"enabled": False}},
                                    data={"train": str(csv_path), "feature_cache": str(tmp_path / "features")},
                                    train={"epochs": 1, "batch_size": 10}))
    result = train(config, tmp_path / "run")
    assert load_checkpoint(result.best_checkpoint).fingerprint
    assert 0 <= result.metrics["val"]["R@1"] <= 100

    asked = len(server.requests)
    assert download("flickr8k", out, urls=_flickr_urls(server)) == csv_path  # already there: nothing fetched
    assert len(server.requests) == asked


def test_personality_captions_download_skips_failed_photos_resumes_and_trains(server: _Server, tmp_path: Path,
                                                                             tiny_text_model: Path) -> None:
    hashes = [hashlib.md5(str(i).encode()).hexdigest() for i in range(6)]  # YFCC hashes look like md5 hex
    records = {
        "train": [{"image_hash": h, "personality": "Sweet", "comment": f"Aww, photo {i}."}
                  for i, h in enumerate(hashes[:4])],
        "val": [{"image_hash": hashes[4], "personality": "Angry", "comment": "Ugh, photo 4."}],
        "test": [{"image_hash": hashes[5], "personality": "Sarcastic", "comment": "Oh wow, photo 5.",
                  "candidates": ["Oh wow, photo 5.", "Aww, photo 0."], "additional_comments": []}],
    }
    files = {f"personality_captions/{split}.json": json.dumps(recs).encode() for split, recs in records.items()}
    files["personality_captions/personalities.txt"] = b"Sweet\nAngry\nSarcastic\n"
    _tgz(server.root / "personality_captions.tgz", files)
    base = server.root / "yfcc"
    missing = {hashes[1], hashes[4]}  # photos that no longer download (404)
    for i, h in enumerate(hashes):
        if h not in missing:
            (base / h[:3] / h[3:6]).mkdir(parents=True, exist_ok=True)
            (base / h[:3] / h[3:6] / f"{h}.jpg").write_bytes(image_bytes(seed=i))
    out = tmp_path / "pc"
    args = ["data", "download", "personality-captions", "--out", str(out), "--url",
            f"{server.url}/personality_captions.tgz", "--base-url", f"{server.url}/yfcc", "--workers", "3"]
    assert main(args) == 0
    failed = dict(line.split("\t") for line in (out / "failed_images.txt").read_text().splitlines())
    assert set(failed) == missing and all("HTTP 404" in reason for reason in failed.values())
    train = load_dataset(out / "train.json")
    assert train.skipped.counts == {"missing image": 1} and len(train) == 3
    test = load_dataset(out / "test.json")
    assert len(test) == 1 and test.records[0].candidates == ("Oh wow, photo 5.", "Aww, photo 0.")
    assert (out / "personalities.txt").read_text().split() == ["Sweet", "Angry", "Sarcastic"]
    assert not list(out.rglob("*.part")) and sorted(p.name for p in tmp_path.iterdir()) == ["pc", "www"]

    h = hashes[1]  # the photo is back: a rerun fetches it alone, not the archive or the photos already there
    (base / h[:3] / h[3:6]).mkdir(parents=True, exist_ok=True)
    (base / h[:3] / h[3:6] / f"{h}.jpg").write_bytes(image_bytes(seed=1))
    server.requests.clear()
    assert main(args) == 0
    assert sorted(server.requests) == sorted([f"/yfcc/{h[:3]}/{h[3:6]}/{h}.jpg" for h in missing])
    assert (out / "failed_images.txt").read_text().split("\t")[0] == hashes[4]
    assert len(load_dataset(out / "train.json")) == 4

    from tests.helpers import tiny_tree
    from transresnet.config import build_config
    from transresnet.train import train

    traits = {"personality": {"traits_file": str(out / "personalities.txt")}}
    data = {"train": str(out / "train.json"), "val": str(out / "test.json"),  # val's one photo is still missing
            "feature_cache": str(tmp_path / "features")}
    result = train(build_config(tiny_tree(tiny_text_model, model=traits, data=data,
                                          train={"epochs": 1, "batch_size": 4})), tmp_path / "run")
    assert result.best_checkpoint.is_dir()
    assert result.metrics["val"]["queries"] == 1  # the test record ranked against its own two candidates


def test_known_checksum_and_size_are_checked(server: _Server, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(b"x" * 1000)
    good = hashlib.sha256(b"x" * 1000).hexdigest()
    assert fetch(Remote(f"{server.url}/file.bin", good, 1000), tmp_path / "a.bin").read_bytes() == b"x" * 1000
    with pytest.raises(ValueError, match="sha256"):
        fetch(Remote(f"{server.url}/file.bin", "0" * 64), tmp_path / "b.bin")
    with pytest.raises(ValueError, match="not the 999 of the known size"):
        fetch(Remote(f"{server.url}/file.bin", size=999), tmp_path / "c.bin")
    server.short.add("/file.bin")
    with pytest.raises((OSError, ValueError), match="cut off"):  # short of its Content-Length
        fetch(Remote(f"{server.url}/file.bin"), tmp_path / "d.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "www"]  # nothing half-written left


def test_archives_with_members_outside_their_folder_are_refused(tmp_path: Path) -> None:
    evil_zip = _zip(tmp_path / "evil.zip", {"../escape.txt": b"x"})
    with pytest.raises(ValueError, match="outside its folder"):
        extract(evil_zip, tmp_path / "x")
    evil_tar = _tgz(tmp_path / "evil.tgz", {"/etc/escape.txt": b"x"})
    with pytest.raises(ValueError, match="outside its folder"):
        extract(evil_tar, tmp_path / "y")
    (tmp_path / "page.html").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract(tmp_path / "page.html", tmp_path / "z")
    assert not (tmp_path / "escape.txt").exists()


def test_offline_is_one_clear_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["data", "download", "flickr8k", "--out", str(tmp_path / "f"), "--url", f"images={dead}/a.zip",
                 "--url", f"text={dead}/b.zip", "--timeout", "5"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"cannot download {dead}/" in errors[0] and "offline?" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no dataset, staging or download folder


def test_bad_names_and_flags_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        download("coco", tmp_path)
    with pytest.raises(ValueError, match="write KEY=URL with KEY one of images, text"):
        download("flickr8k", tmp_path, urls=["http://127.0.0.1:1/x.zip"])
    with pytest.raises(ValueError, match="--base-url only applies"):
        download("flickr8k", tmp_path, base_url="http://127.0.0.1:1")
    assert photo_url("http://h/images", "abcdef0123") == "http://h/images/abc/def/abcdef0123.jpg"
