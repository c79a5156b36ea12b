"""What each entry point imports: the admin's everyday commands stay light.

Loading the config and ``pacsnode studies`` must not import torch or MONAI
(seconds of start-up, and gigabytes on a machine without them), and the
analysis settings must not import pynetdicom (analysis never touches the
network). Each check runs in a fresh interpreter, since the test process has
imported everything already.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.helpers import REPO

_CHECK = """
import sys
from pacsnode.node.cli import main
from pacsnode.node.config import load
load({config!r})
status = main(["--config", {config!r}, "studies"])
heavy = sorted(m for m in ("torch", "monai") if m in sys.modules)
assert status == 0, status
assert not heavy, f"loading the config and listing studies imported {{heavy}}"
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_config_and_studies_import_neither_torch_nor_monai(tmp_path: Path) -> None:
    # The shipped default config (with its model rule) in a folder of its own: var/ lands beside it.
    (tmp_path / "config").mkdir()
    config = tmp_path / "config" / "pacsnode.yaml"
    shutil.copy(REPO / "config" / "pacsnode.yaml", config)
    done = _run(_CHECK.format(config=str(config)), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 studies" in done.stdout
    assert (tmp_path / "var" / "pacsnode.db").exists()


def test_analysis_settings_do_not_import_pynetdicom(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import pacsnode.analysis.settings\n"
        "import pacsnode.analysis.routing\n"
        "match = pacsnode.analysis.settings.RuleMatch(sop_class=['CTImageStorage', '1.2.840.10008.5.1.4.1.1.4'])\n"
        "assert match.sop_class == ['1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.5.1.4.1.1.4'], match.sop_class\n"
        "assert 'pynetdicom' not in sys.modules, 'the analysis settings imported pynetdicom'\n"
    )
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
