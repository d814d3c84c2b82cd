"""A two-node Ray cluster (``ray.cluster_utils.Cluster``): trials spread over both nodes."""

from __future__ import annotations

import pytest

from rsilora import results
from rsilora.config import load_config

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
