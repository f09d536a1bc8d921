"""`generate` and `grade` on a Dask cluster (``--scheduler``, ``grade --workers``): the same bytes as a local run,
a lost worker's chunk redone, Ctrl-C cancelling the rest, an unreachable scheduler refused before any write."""

import hashlib
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders.base import get_grader
from synthtrial.grade import grade_run
from synthtrial.run.generation import generate
from synthtrial.run.verify import verify
from synthtrial.util.errors import SynthtrialError

pytest.importorskip("distributed")

#: two patients x nine days: four chunks (8 + 1 images per patient), so a worker can be caught mid-chunk
DAYS = 9
PROTOCOL = "patient_id,day,treatment,severity\n" + "".join(
    f"{pid},{day},{'Control' if day <= 4 else 'Cream'},{sev + 0.1 * day:.2f}\n"
    for pid, sev in (("a1", 1.8), ("b2", 0.6)) for day in range(1, DAYS + 1))
SIZE = 128


def digests(run: Path) -> dict[str, str]:
    """sha256 of every file of a run, by its path inside the run."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client

    from synthtrial.util.cluster import local_cluster

    cluster = local_cluster(2)
    client = Client(cluster)
    client.run(lambda: __import__("synthtrial.run.rendering"))   # warm the workers once for the module
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("proto") / "two.csv"
    path.write_text(PROTOCOL)
    return path


@pytest.fixture(scope="module")
def local_run(protocol, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    generate(protocol, out, size=SIZE, progress=False)
    grade_run(out, [get_grader("counter")])
    return out


def test_generate_on_a_two_worker_cluster_is_byte_identical(cluster, protocol, local_run, tmp_path):
    out = tmp_path / "dask"
    result = CliRunner().invoke(app, ["generate", str(protocol), "--out", str(out), "--size", str(SIZE), "--quiet",
                                      "--scheduler", cluster[0].scheduler_address])
    assert result.exit_code == 0, result.output
    grade_run(out, [get_grader("counter")], scheduler=cluster[0].scheduler_address)
    assert digests(out) == digests(local_run)
    assert len(digests(out)) > 4 * DAYS


def test_an_unreachable_scheduler_is_refused_before_any_write(protocol, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["generate", str(protocol), "--out", str(out), "--size", str(SIZE), "--quiet",
                                      "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr and "--scheduler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_ctrl_c_cancels_the_cluster_work_and_the_run_resumes_exactly(cluster, protocol, local_run, tmp_path):
    out, client = tmp_path / "interrupted", cluster[1]

    def interrupt(done, total, status):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(protocol, out, size=SIZE, progress=False, scheduler=cluster[0].scheduler_address,
                 on_progress=interrupt)
    assert not (out / "manifest.parquet").exists()
    assert not any(client.processing().values())
    generate(protocol, out, size=SIZE, progress=False, scheduler=cluster[0].scheduler_address)
    grade_run(out, [get_grader("counter")])
    assert digests(out) == digests(local_run)


def test_a_worker_killed_mid_run_has_its_chunk_redone(cluster, protocol, local_run, tmp_path):
    """kill -9 of a worker that is rendering a chunk: the scheduler gives the chunk to the other worker; no temp
    file survives, verify accepts the run, and its bytes are the local run's. (Last in the module: the nanny
    restarts the worker.)"""
    out, client = tmp_path / "killed", cluster[1]
    pids = client.run(os.getpid)
    killed = []

    def kill_a_busy_worker(done, total, status):
        if killed:
            return
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(busy[0])

    generate(protocol, out, size=SIZE, progress=False, scheduler=cluster[0].scheduler_address,
             on_progress=kill_a_busy_worker)
    assert killed, "no worker was busy when the first chunk finished"
    assert not list(out.rglob("*.tmp"))
    assert verify(out) == []
    grade_run(out, [get_grader("counter")])
    assert digests(out) == digests(local_run)


def test_grade_workers_start_a_local_cluster_with_the_same_bytes(local_run, tmp_path):
    import shutil

    with pytest.raises(SynthtrialError, match="--workers must be between 1 and 64, got 0"):
        grade_run(local_run, [get_grader("counter")], workers=0)
    copy = tmp_path / "copy"
    shutil.copytree(local_run, copy)
    shutil.rmtree(copy / ".grades")
    (copy / "grades.parquet").unlink()
    result = CliRunner().invoke(app, ["grade", str(copy), "--graders", "counter", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert digests(copy) == digests(local_run)
