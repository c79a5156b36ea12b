"""Instances go to and from disk as they travel: the node's memory does not grow with the instance.

``pacsnode serve`` (one acceptor, in the serve process) receives a 192 MiB
instance from DCMTK storescu. Its peak resident set (VmHWM, which counts every
page the process ever had resident, anonymous or mapped) must grow by far less
than the instance: the fragments are written to a file in the store's tmp/ as
they arrive, walked through a mapping that reads only element headers, and
copied into the store in 1 MiB pieces. DCMTK getscu then retrieves it: the
C-STORE sub-operation is sent from the stored file, never read whole.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import create_engine, func, select

from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage.models import Instance
from tests.support.helpers import wait_until
from tests.support.peers import require
from tests.support.served import Served

FRAMES = 384  # 384 frames of 512x512 16-bit pixels: 192 MiB
GROWTH_BOUND = 64 << 20  # far below the instance; buffering it in memory alone would take 192 MiB


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_a_large_instance_is_received_without_holding_it_in_memory(tmp_path: Path) -> None:
    ds = make_dataset(rows=512, columns=512)
    ds.NumberOfFrames = FRAMES
    ds.PixelData = bytes(512 * 512 * 2 * FRAMES)
    study_uid = str(ds.StudyInstanceUID)
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds

    (tmp_path / "node").mkdir()
    served = Served(tmp_path / "node", processes=1, timeouts={"shutdown_grace": 1})
    served.start()
    try:
        assert served.proc is not None
        before = _peak_rss(served.proc.pid)
        done = subprocess.run(
            [require("storescu"), "-aec", "PACSNODE", "-aet", "BIGSCU", "127.0.0.1", str(served.port), str(big)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        engine = create_engine(f"sqlite:///{served.db}")
        try:

            def stored() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())

            wait_until(lambda: stored() == 1, 30, "the instance to be indexed")
        finally:
            engine.dispose()
        growth = _peak_rss(served.proc.pid) - before
        assert growth < GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MiB receiving a {FRAMES // 2} MiB instance"
        assert list((served.root / "tmp").iterdir()) == []

        retrieved = tmp_path / "retrieved"
        retrieved.mkdir()
        done = subprocess.run(
            [
                require("getscu"),
                *("-aec", "PACSNODE", "-aet", "BIGSCU", "-S", "-od", str(retrieved)),
                *("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"),
                *("127.0.0.1", str(served.port)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        [copy] = list(retrieved.iterdir())
        assert copy.stat().st_size >= FRAMES * 512 * 512 * 2
        growth = _peak_rss(served.proc.pid) - before
        assert growth < GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MiB sending a {FRAMES // 2} MiB instance"
    finally:
        served.stop()
