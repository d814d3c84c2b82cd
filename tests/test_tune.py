"""The Ray Tune service on a real Ray head: job submission, ASHA, stages, restarts, resume, retrieval.

A real ``ray start --head`` (loopback dashboard, token authentication on) is started once for the
module; jobs go through the ``ray job submit`` CLI and are watched with ``JobSubmissionClient``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rsilora import results
from rsilora.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@dataclass
class Head:
    gcs: str
    dashboard: str
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dashboard}"
    _wait_for(lambda: subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                                     capture_output=True).returncode == 0, timeout=90, every=1)  # jobs API up
    yield Head(f"127.0.0.1:{gcs}", address, env)
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def _stage_args(synth, tiny_model_dir, storage, *extra, uri: bool = False) -> list[str]:
    """Stage-job arguments on the session's tiny fixtures; ``uri`` passes the storage as file://."""
    return ["--preset", "tiny", "--storage", f"file://{storage}" if uri else str(storage),
            f"data.rsicap_dir={synth.rsicap_dir}",
            f"data.rsieval_dir={synth.rsieval_dir}", f"data.split_dir={storage}/splits",
            f"model.name_or_path={tiny_model_dir}", "train.progress=false", *extra]


def _job_status(head: Head, submission_id: str, timeout: float = 400) -> str:
    """Poll Ray's JobSubmissionClient (in a child process that carries the auth token)."""
    code = ("import sys, time\nfrom ray.job_submission import JobSubmissionClient, JobStatus\n"
            f"client = JobSubmissionClient({head.dashboard!r})\n"
            f"deadline = time.time() + {timeout}\n"
            f"while (status := client.get_job_status({submission_id!r})) not in "
            "(JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:\n"
            "    time.sleep(1)\n"
            "print(status.value)\n")
    done = subprocess.run([sys.executable, "-c", code], env=head.env, capture_output=True, text=True,
                          timeout=timeout + 60)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr


@pytest.fixture(scope="module")
def stage1(head, synth, tiny_model_dir, tmp_path_factory):
    """Stage 1 on the tiny preset, submitted with the `ray job submit` CLI."""
    storage = tmp_path_factory.mktemp("storage")
    submission = f"rsilora-test-{secrets.token_hex(4)}"
    subprocess.run([BIN / "ray", "job", "submit", "--address", head.dashboard, "--submission-id", submission,
                    "--runtime-env", "tune_jobs/runtime_env.yaml", "--no-wait", "--",
                    sys.executable, "tune_jobs/stage1.py", "--name", "s1",
                    *_stage_args(synth, tiny_model_dir, storage)],
                   cwd=REPO, env=head.env, check=True, capture_output=True, timeout=120)
    status = _job_status(head, submission)
    logs = subprocess.run([BIN / "ray", "job", "logs", "--address", head.dashboard, submission],
                          env=head.env, capture_output=True, text=True).stdout
    return storage / "s1", status, logs


def test_job_without_the_token_is_refused(head):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(Path(head.env["RAY_AUTH_TOKEN_PATH"]).parent)  # no ~/.ray/auth_token here
    out = subprocess.run([BIN / "ray", "job", "list", "--address", head.dashboard], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "token" in (out.stdout + out.stderr).lower()


def test_stage1_job_succeeds_and_asha_stops_weak_trials(stage1):
    experiment, status, logs = stage1
    assert status == "SUCCEEDED", logs[-3000:]
    assert "stage1 (LoRA shape" in logs and "best of" in logs  # the space is printed, then the best
    trials = results.read_trials(experiment)
    assert len(trials) == 8
    assert any(t.status == "stopped by ASHA" for t in trials)
    assert sum(t.epochs_run for t in trials) < sum(t.planned_epochs for t in trials)
    for t in trials:  # every reported epoch carries the monitoring fields
        assert {"train_loss", "val_loss", "lr", "epoch_time_s", "peak_mem_gb"} <= set(t.history[0])
    assert list(experiment.glob("*/events.out.tfevents.*"))  # TensorBoard per trial, under the experiment


def test_best_and_export_agree_with_ray_result_grid(stage1, tmp_path):
    from ray.tune import ExperimentAnalysis, ResultGrid

    experiment, _, _ = stage1
    ours = results.best(experiment)
    grid = ResultGrid(ExperimentAnalysis(str(experiment), default_metric="val_loss", default_mode="min"))
    theirs = grid.get_best_result("val_loss", "min", scope="all")
    assert theirs.metrics["trial_id"] == ours.trial_id
    assert theirs.metrics_dataframe["val_loss"].min() == pytest.approx(ours.val_loss)
    assert {k: theirs.config[k] for k in ours.overrides} == ours.overrides
    best_checkpoint = theirs.get_best_checkpoint("val_loss", "min")
    assert Path(best_checkpoint.path) == Path(ours.checkpoint)

    cli = subprocess.run([BIN / "rsilora", "best", str(experiment), "--json"], capture_output=True, text=True)
    assert json.loads(cli.stdout)["trial_id"] == ours.trial_id

    out = tmp_path / "best"
    done = subprocess.run([BIN / "rsilora", "export-best", str(experiment), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from peft import PeftModel
    from transformers import InstructBlipForConditionalGeneration

    config = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert config.lora.r == ours.overrides["lora.r"]
    model = PeftModel.from_pretrained(InstructBlipForConditionalGeneration.from_pretrained(config.model.name_or_path),
                                      out)
    exported = load_file(out / "adapter_model.safetensors")
    kept = load_file(Path(ours.checkpoint) / "weights" / "adapter_model.safetensors")
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    again = subprocess.run([BIN / "rsilora", "export-best", str(experiment), "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_stage2_starts_from_stage1_best(head, stage1, synth, tiny_model_dir):
    experiment1, _, _ = stage1
    storage = experiment1.parent
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    done = subprocess.run([sys.executable, "tune_jobs/stage2.py", "--name", "s2", "--previous", str(experiment1),
                           *_stage_args(synth, tiny_model_dir, storage)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    best1 = results.best(experiment1)
    record = results.read_stage(storage / "s2")
    assert record["previous"]["experiment"] == str(experiment1)
    assert record["previous"]["trial_id"] == best1.trial_id
    for trial in results.read_trials(storage / "s2"):
        for key, value in best1.overrides.items():  # stage 1's LoRA shape, in every stage-2 trial
            section, name = key.split(".")
            assert trial.config[section][name] == value
        assert set(trial.overrides) == {"train.lr", "train.epochs", "train.weight_decay"}


def _trial_rows(experiment: Path) -> dict[str, list[dict]]:
    rows = {}
    for path in experiment.glob("*/result.json"):
        rows[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _start_stage1(head, synth, tiny_model_dir, storage, name, *extra, uri: bool = False) -> subprocess.Popen:
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    return subprocess.Popen([sys.executable, "tune_jobs/stage1.py", "--name", name, "--space", "plan",
                             "--scheduler", "fifo", *_stage_args(synth, tiny_model_dir, storage, *extra, uri=uri),
                             "train.early_stopping_patience=null"],  # every trial runs its 5 epochs
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float = 300, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not reached")


def test_killed_trial_worker_restarts_from_its_checkpoint(head, synth, tiny_model_dir, tmp_path):
    # storage given as a URI (file://): the pyarrow path that s3:// storage takes
    driver = _start_stage1(head, synth, tiny_model_dir, tmp_path, "kill", "tune.max_failures=2", uri=True)
    experiment = tmp_path / "kill"

    def mid_run_worker():
        if not any(1 <= len(r) < 4 for r in _trial_rows(experiment).values()):
            return None
        return next((p for p in psutil.process_iter(["cmdline"])
                     if (p.info["cmdline"] or [""])[0].startswith("ray::ImplicitFunc")), None)

    victim = _wait_for(mid_run_worker)
    victim.send_signal(signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    trials = results.read_trials(f"file://{experiment}")
    assert len(trials) == 5 and all(t.status == "completed" for t in trials)
    assert results.best(f"file://{experiment}").checkpoint.startswith(f"file://{experiment}/")
    restored = [rows for rows in _trial_rows(experiment).values()
                if any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for r in rows)]
    assert restored, "no trial resumed from a checkpoint after the kill"
    epochs = [r["epoch"] for r in restored[0]]
    assert epochs[-1] == 5 and epochs.count(1) == 1  # continued, not started over


def test_interrupted_search_resumes_without_rerunning_completed_trials(head, synth, tiny_model_dir, tmp_path):
    args = (head, synth, tiny_model_dir, tmp_path, "resume", "tune.max_concurrent=1")
    experiment = tmp_path / "resume"
    driver = _start_stage1(*args)
    _wait_for(lambda: sum(len(r) == 5 for r in _trial_rows(experiment).values()) >= 2)
    driver.send_signal(signal.SIGINT)
    first, _ = driver.communicate(timeout=300)
    before = {name: len(rows) for name, rows in _trial_rows(experiment).items()}
    finished_before = {name for name, n in before.items() if n == 5}
    assert 2 <= len(finished_before) < 5, (before, first[-3000:])

    again = _start_stage1(*args)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert "resuming experiment" in output
    rows = _trial_rows(experiment)
    after = {name: len(r) for name, r in rows.items()}
    # an interrupted trial may report an epoch twice (Ray resumes from the last checkpoint its
    # saved state knew of): at least once, every epoch
    assert len(rows) == 5 and all({r["epoch"] for r in trial} == {1, 2, 3, 4, 5} for trial in rows.values()), (
        before, after, output[-3000:])
    assert all(after[name] == 5 == before[name] for name in finished_before), (before, after)  # not re-run


def test_cluster_yaml_passes_rays_own_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "local"
    validate_config(prepare_config(config))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
