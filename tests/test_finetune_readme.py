"""The README's fine-tuning example, run as written on a Ray with as many CPUs as Train workers.

The ``bitray`` on the PATH here starts a local Ray of exactly 2 CPUs (a 2-core machine) before the CLI
runs: the two Train workers then hold every CPU, which once left the per-epoch data shuffle waiting for
ever. The example must finish (under the timeout), and a streamed set that would wait is refused at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SHIM = textwrap.dedent(
    """\
    import sys

    import bitray  # noqa: F401  (Keras 2 before TensorFlow)

    if sys.argv[1:2] in (["finetune"], ["embed"]):
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    from bitray.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Fine-tuning", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


def _bitray_on_two_cpus(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "shim.py").write_text(SHIM)
    launcher = bin_dir / "bitray"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir / "shim.py"}" "$@"\n')
    launcher.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return env


def test_the_readme_example_finishes_with_two_workers_on_two_cpus(tmp_path):
    example = _readme_example()
    assert "--workers 2" in example and "bitray finetune" in example
    env = _bitray_on_two_cpus(tmp_path)
    done = subprocess.run(
        ["bash", "-euc", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "digits-model" / "classifier" / "saved_model.pb").is_file()
    assert list((tmp_path / "digits-embeddings").rglob("*.parquet"))
    assert "fine-tune step 100/100" in done.stdout  # rank 0's progress line, forwarded by Ray


def test_a_streamed_set_without_a_cpu_for_its_data_tasks_is_refused_at_once(tmp_path):
    from bitray.examples import write_digits

    write_digits(str(tmp_path / "digits"))
    (tmp_path / "stream.yaml").write_text("cache_decoded: false\nresize: 32\ncrop: 28\nsteps: 10\n")
    env = _bitray_on_two_cpus(tmp_path)
    command = [
        "bitray", "finetune", "--config", "stream.yaml", "--data", "digits", "--output", "model",
        "--model", "random:tiny", "--workers", "2", "--batch-size", "64",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "needs 3 CPUs" in done.stderr and "the Ray cluster has 2" in done.stderr
    assert "Traceback" not in done.stderr
