"""Multi-node Ray clusters: trials spread over two nodes; a node blind to the storage is refused."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rsilora import results
from rsilora.config import load_config

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def test_trials_spread_over_two_nodes_with_results_in_shared_storage(synth, tiny_model_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from rsilora.tune import run_stage

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        storage = tmp_path / "shared"
        config = load_config(overrides=[
            f"data.rsicap_dir={synth.rsicap_dir}", f"data.rsieval_dir={synth.rsieval_dir}",
            f"data.split_dir={storage}/splits", f"model.name_or_path={tiny_model_dir}",
            f"tune.storage={storage}", "tune.scheduler=fifo", "tune.cpus_per_trial=1", "train.progress=false",
            "train.early_stopping_patience=null",
        ], preset="tiny", base_dir=tmp_path)
        experiment, grid = run_stage("stage1", config, "plan", name="two-nodes")
        assert not [r for r in grid if r.error]
        trials = results.read_trials(experiment)
        assert len(trials) == 5 and all(t.status == "completed" for t in trials)
        nodes = {node for t in trials for node in t.nodes}
        assert len(nodes) == 2  # both nodes ran trials
        assert all(t.trial_dir.startswith(str(storage)) for t in trials)
        assert all((storage / "two-nodes" / t.trial_dir.split("/")[-1] / "result.json").is_file() for t in trials)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _can_hide_a_folder() -> bool:
    """Whether this machine lets us mount a tmpfs in a private mount namespace (root or CAP_SYS_ADMIN)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            return subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none",
                                   folder], capture_output=True, timeout=30).returncode == 0
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return False


@pytest.mark.skipif(not _can_hide_a_folder(), reason="needs unshare -m and mount (root or CAP_SYS_ADMIN)")
def test_a_node_that_cannot_see_the_local_storage_is_refused(tmp_path):
    """A real second node that does not see the storage folder: its own mount namespace, where an
    empty tmpfs hides the folder (as a node without the NFS mount would)."""
    import ray
    from ray.cluster_utils import Cluster

    from rsilora.tune import check_shared_storage

    storage = tmp_path / "storage"
    storage.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    blind = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs none {storage} && exec {BIN / 'ray'} start --block "
                              f"--address={cluster.address} --node-ip-address=127.0.0.1 --num-cpus=1 "
                              "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ray.init(address=cluster.address)
        deadline = time.time() + 90
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline and blind.poll() is None:
            time.sleep(1)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, "the second node did not join"
        with pytest.raises(RuntimeError, match=r"is a local path that 1 of 2 nodes cannot see"):
            check_shared_storage(str(storage))
        assert not list(storage.iterdir())  # the marker file was removed
        check_shared_storage(f"file://{storage}")  # a URI is not checked (Ray's filesystem layer reads it)
    finally:
        ray.shutdown()
        blind.terminate()
        try:
            blind.wait(timeout=60)
        except subprocess.TimeoutExpired:
            blind.kill()
        cluster.shutdown()
