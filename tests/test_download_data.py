"""scripts.download_data against a local HTTP server that speaks range requests (no network needed)."""
import http.server
import os
import threading

import pytest

from scripts import download_data


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        self.requests.append((name, self.headers.get("Range")))
        if name not in self.files:
            self.send_error(404)
            return
        body, start = self.files[name], 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(download_data, "BASE_URL", f"http://127.0.0.1:{httpd.server_port}/files")
    monkeypatch.setattr(download_data.time, "sleep", lambda s: None)
    RangeHandler.requests = []
    yield RangeHandler
    httpd.shutdown()


def test_download_skip_and_resume(server, tmp_path):
    server.files = {f"shard_{i:05d}.parquet": bytes([i % 256]) * 1000 + os.urandom(500) for i in (0, 1, 1822)}
    (tmp_path / "shard_00000.parquet").write_bytes(server.files["shard_00000.parquet"])  # already there
    (tmp_path / "shard_00001.parquet.tmp").write_bytes(server.files["shard_00001.parquet"][:700])  # interrupted
    (tmp_path / "shard_01822.parquet.tmp").write_bytes(server.files["shard_01822.parquet"])  # whole, never renamed
    for index in (0, 1, 1822):
        assert download_data.download(index, str(tmp_path)) is None
    for name, body in server.files.items():
        assert (tmp_path / name).read_bytes() == body
    assert server.requests == [("shard_00001.parquet", "bytes=700-"), ("shard_01822.parquet", "bytes=1500-"),
                               ("shard_01822.parquet", None)]  # 416 for the whole .tmp: downloaded again
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_files_are_named(server, tmp_path, monkeypatch, capsys):
    server.files = {"shard_00000.parquet": b"x" * 10}
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["download_data", "-n", "2"])
    with pytest.raises(SystemExit) as err:
        download_data.main()
    message = str(err.value)
    assert "shard_00001.parquet, shard_01822.parquet" in message and str(tmp_path / "base_data") in message
    assert (tmp_path / "base_data" / "shard_00000.parquet").exists()


def test_stand_in_and_real_shards_never_mix(tmp_path, monkeypatch):
    from conftest import run_module
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    data = tmp_path / "base_data"
    data.mkdir()
    (data / "shard_00000.parquet").write_bytes(b"real")
    refused = run_module("scripts.local_corpus", "--max-chars", "20000", env=env)
    assert refused.returncode != 0 and "not mixing a stand-in" in refused.stderr
    (data / "shard_00000.parquet").unlink()
    run_module("scripts.local_corpus", "--max-chars", "20000", "--num-shards", "6", env=env, check=True)
    run_module("scripts.local_corpus", "--max-chars", "20000", "--num-shards", "3", env=env, check=True)
    assert sorted(p.name for p in data.glob("*.parquet")) == [f"shard_0000{i}.parquet" for i in range(3)]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["download_data", "-n", "1"])
    with pytest.raises(SystemExit, match="local stand-in"):
        download_data.main()


def test_climbmix_goes_to_its_own_directory(server, tmp_path, monkeypatch):
    """--dataset climbmix (the modern recipe's): nanochat's ClimbMix shards, validation shard_06542, in
    base_data_climbmix/, which every stage reads under NANOCHAT_DATASET=climbmix."""
    from nanochat_jax.data.dataset import data_dir, split_shards
    server.files = {name: b"c" * 10 for name in ("shard_00000.parquet", "shard_06542.parquet")}
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["download_data", "-n", "1", "--dataset", "climbmix"])
    download_data.main()
    assert sorted(p.name for p in (tmp_path / "base_data_climbmix").iterdir()) == list(server.files)
    assert not (tmp_path / "base_data").exists()
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    assert data_dir() == str(tmp_path / "base_data_climbmix")
    assert split_shards("val")[0].endswith("shard_06542.parquet")
    monkeypatch.setenv("NANOCHAT_DATASET", "c4")
    with pytest.raises(ValueError, match="NANOCHAT_DATASET='c4'"):
        data_dir()
