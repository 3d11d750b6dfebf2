"""Local paths on a cluster of two Ray nodes (``ray.cluster_utils.Cluster``, in a process of its own so the
session's Ray is untouched): refused at once, or, when declared shared, checked on every node."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys
    import ray
    from ray.cluster_utils import Cluster
    from bitray.config import EmbedConfig
    from bitray.embed.resources import check_local_paths
    from bitray.errors import BitrayError

    src, out, missing = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        try:
            check_local_paths(EmbedConfig(inputs=[src], output=out), out, cluster.address)
            print("NOT REFUSED")
        except BitrayError as exc:
            print("REFUSED:", exc)
        check_local_paths(EmbedConfig(inputs=[src], output=out, shared_storage=True), out, cluster.address)
        print("SHARED OK")
        try:
            shared = EmbedConfig(inputs=[missing], output=out, shared_storage=True)
            check_local_paths(shared, out, cluster.address)
            print("MISSING NOT SEEN")
        except BitrayError as exc:
            print("MISSING:", exc)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_local_paths_on_two_nodes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "out"), str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.split(":")[0] in ("REFUSED", "SHARED OK",
             "MISSING", "NOT REFUSED", "MISSING NOT SEEN")]  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert lines[0].startswith("REFUSED:") and "cluster of 2 nodes" in lines[0] and str(src) in lines[0]
    assert lines[1] == "SHARED OK"  # both nodes run on this machine, so both see the paths
    assert lines[2].startswith("MISSING:") and "does not see" in lines[2] and "nowhere" in lines[2]
