"""Run directories on object storage: generate -> grade -> verify -> analyze -> export with ``--out s3://...``
against a local S3 server (moto's server mode on 127.0.0.1, s3fs with its endpoint), the lease that locks a
remote run, and atomic object writes."""

import hashlib
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from synthtrial.cli import app  # noqa: E402
from synthtrial.run.generation import generate  # noqa: E402
from synthtrial.util import storage  # noqa: E402
from synthtrial.util.atomic import write_bytes_atomic  # noqa: E402

BUCKET = "trials"
PROTOCOL = "patient_id,day,treatment,severity\n" + "".join(
    f"{pid},{day},{'Control' if day % 4 < 2 else 'Cream'},{sev + 0.15 * (day % 4 < 2):.2f}\n"
    for pid, sev in (("a1", 1.6), ("b2", 0.7)) for day in range(1, 9))
SIZE = 128


@pytest.fixture(scope="module")
def s3():
    """A local S3 server for the module; fsspec's s3 configuration points at it (restored afterwards)."""
    import boto3
    import fsspec.config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "test", "secret": "test",
                                "skip_instance_cache": True}
    yield endpoint
    if before is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = before
    server.stop()


def remote_digests(url: str) -> dict[str, str]:
    fs, root = storage.filesystem(url)
    return {key[len(root) + 1:]: hashlib.sha256(fs.cat_file(key)).hexdigest() for key in sorted(fs.find(root))}


def local_digests(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("proto") / "two.csv"
    path.write_text(PROTOCOL)
    return path


def test_generate_grade_analyze_export_on_s3(s3, protocol, tmp_path):
    url = f"s3://{BUCKET}/pipeline"
    runner = CliRunner()

    def ok(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.stdout

    assert url in ok("generate", str(protocol), "--out", url, "--size", str(SIZE), "--quiet")
    local = generate(protocol, tmp_path / "local", size=SIZE, progress=False)
    assert remote_digests(url) == local_digests(local)   # the same bytes as a local run, no lease left behind
    ok("grade", url, "--graders", "counter", "--quiet")
    assert "OK" in ok("verify", url, "--quiet")
    assert f"{url}/analysis" in ok("analyze", url, "--no-autoencoder", "--permutations", "100", "--quiet")
    ok("export", url, "--format", "coco", "--quiet")
    keys = remote_digests(url)
    assert {"grades.parquet", "grades.json", "analysis/effects.csv", "analysis/report.html"} <= set(keys)
    assert any(k.startswith("exports/coco") for k in keys)
    assert not any(k.endswith(".tmp") or k == ".lock" for k in keys)
    fs, root = storage.filesystem(url)
    assert json.loads(fs.cat_file(f"{root}/grades.json"))["graders"]["counter"]["outcomes"]


def test_a_remote_run_is_resumed_and_healed(s3, protocol, tmp_path):
    url = f"s3://{BUCKET}/heal"
    generate(protocol, url, size=SIZE, progress=False)
    fs, root = storage.filesystem(url)
    before = remote_digests(url)
    image = sorted(k for k in fs.find(f"{root}/images"))[0]
    fs.pipe_file(image, b"damaged")
    fs.rm_file(f"{root}/manifest.parquet")
    from synthtrial.run.verify import verify

    with pytest.raises(Exception, match="manifest.parquet"):
        verify(url)
    generate(protocol, url, size=SIZE, progress=False)
    assert remote_digests(url) == before
    assert verify(url) == []


def test_a_live_lease_refuses_a_second_writer_and_an_expired_one_is_taken_over(s3, protocol):
    url = f"s3://{BUCKET}/leased"
    fs, root = storage.filesystem(url)
    holder = storage.Lease(fs, f"{root}/.lock", seconds=30)
    holder.acquire()
    try:
        result = CliRunner().invoke(app, ["generate", str(protocol), "--out", url, "--size", str(SIZE), "--quiet"])
        assert result.exit_code == 2
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "another synthtrial process is writing this run" in line, line
        assert "--out" in line and holder.owner in line
        assert fs.find(root) == [f"{root}/.lock"]   # nothing written beside the lease
        with pytest.raises(storage.LeaseHeld):
            storage.Lease(fs, f"{root}/.lock").acquire()
    finally:
        holder.release()
    assert not fs.exists(f"{root}/.lock")
    fs.pipe_file(f"{root}/.lock", json.dumps({"owner": "dead", "expires": time.time() - 1}).encode())  # its holder died
    taker = storage.Lease(fs, f"{root}/.lock")
    taker.acquire()
    assert json.loads(fs.cat_file(f"{root}/.lock"))["owner"] == taker.owner
    taker.release()


def test_an_atomic_object_write_leaves_no_temp_key_and_an_unknown_bucket_is_one_line(s3, protocol, tmp_path):
    url = f"s3://{BUCKET}/atomic/x.bin"
    write_bytes_atomic(url, b"abc")
    fs, root = storage.filesystem(url)
    assert fs.cat_file(root) == b"abc" and fs.find(f"{BUCKET}/atomic") == [root]
    result = CliRunner().invoke(app, ["verify", "s3://no-such-bucket/run"])
    assert result.exit_code == 2 and "no such bucket" in result.stderr, result.output
    assert storage.is_remote("gs://b/run") and not storage.is_remote("file:///tmp/run")
    local = generate(protocol, f"file://{tmp_path}/viafile", size=SIZE, progress=False)
    assert Path(local) == tmp_path / "viafile" and (tmp_path / "viafile" / "manifest.parquet").is_file()
