"""launch/tpu_run.sh against a stand-in `gcloud` that records its calls (a v5p-64 slice: 8 workers)."""

import json
import os
import stat
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "launch", "tpu_run.sh")

# Records argv as a JSON line; `describe` answers as a v5p-64 slice (8 endpoints) once created.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$GCLOUD_CALLS"
case "$*" in
  *"tpu-vm describe"*"value(name)"*) [ -f "$GCLOUD_STATE/created" ] || exit 1; echo my-tpu ;;
  *"tpu-vm describe"*"networkEndpoints"*)
    echo "10.0.0.1;10.0.0.2;10.0.0.3;10.0.0.4;10.0.0.5;10.0.0.6;10.0.0.7;10.0.0.8" ;;
  *"tpu-vm create"*) touch "$GCLOUD_STATE/created" ;;
  *"tpu-vm ssh"*) echo "ran on $(printf '%s\n' "$@" | grep -- --worker=)" ;;
esac
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "state"
    state.mkdir()
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        GCLOUD_CALLS=str(tmp_path / "calls"),
        GCLOUD_STATE=str(state),
        LOG_DIR=str(tmp_path / "logs"),
    )

    def run(*args, **kw):
        result = subprocess.run(
            ["bash", SCRIPT, *args],
            env=dict(env, **kw),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        calls_file = tmp_path / "calls"
        calls = (
            [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
        )
        calls_file.unlink(missing_ok=True)
        return result, calls

    run.state, run.logs = state, tmp_path / "logs"
    return run


COMMAND = ["sama-train", "--config=configs/stage1_sft.py:wan_14b", "--workdir=gs://b/runs/sft"]


def test_usage_without_arguments(fake_gcloud):
    result, calls = fake_gcloud()
    assert result.returncode == 2
    assert "TPU_NAME ZONE -- COMMAND" in result.stderr and calls == []


def test_dry_run_creates_nothing_and_prints_every_command(fake_gcloud):
    result, calls = fake_gcloud(
        "--dry-run", "--create=v5p-64", "--project=proj", "my-tpu", "us-east5-a", "--", *COMMAND
    )
    assert result.returncode == 0, result.stderr
    # Only read-only describes ran.
    assert calls and all(c[:3] == ["compute", "tpus", "tpu-vm"] and c[3] == "describe" for c in calls)
    out = result.stdout
    assert (
        "tpu-vm create my-tpu --zone us-east5-a --project proj --accelerator-type v5p-64 "
        "--version v2-alpha-tpuv5" in out
    )
    assert "my-tpu: 8 workers" in out
    assert "tpu-vm scp" in out and "--worker=all" in out
    for w in range(8):
        assert f"--worker={w} --command" in out
    assert "--worker=8" not in out
    assert "SAMA_DISTRIBUTED=1" in out and "sama-train" in out


def test_run_creates_copies_sets_up_and_runs_on_every_worker(fake_gcloud):
    result, calls = fake_gcloud("--create=v5p-64", "my-tpu", "us-east5-a", "--", *COMMAND, SETUP="1")
    assert result.returncode == 0, result.stderr
    verbs = [c[3] for c in calls]
    create = calls[verbs.index("create")]
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    assert create[create.index("--version") + 1] == "v2-alpha-tpuv5"
    scp = calls[verbs.index("scp")]
    assert "--worker=all" in scp and scp[-2:] != []
    ssh = [c for c in calls if c[3] == "ssh"]
    all_workers = [c[c.index("--command") + 1] for c in ssh if "--worker=all" in c]
    assert any("tar xzf /tmp/sama_jax_code.tgz" in c for c in all_workers)
    assert any("pip install -q -r requirements.txt -e ." in c and "jax[tpu]==" in c for c in all_workers)
    jobs = {
        next(a for a in c if a.startswith("--worker=")): c[c.index("--command") + 1]
        for c in ssh
        if "--worker=all" not in c
    }
    assert sorted(jobs) == sorted(f"--worker={w}" for w in range(8))
    assert all(
        "sama-train --config=configs/stage1_sft.py:wan_14b" in j and "SAMA_DISTRIBUTED=1" in j
        for j in jobs.values()
    )
    for w in range(8):  # each worker's output kept in its own log
        assert f"ran on --worker={w}" in (fake_gcloud.logs / f"worker_{w}.log").read_text()

    # The slice exists now: reused, not created again.
    result, calls = fake_gcloud("--create=v5p-64", "--code=none", "my-tpu", "us-east5-a", "--", *COMMAND)
    assert result.returncode == 0 and "reusing the existing slice" in result.stdout
    assert "create" not in [c[3] for c in calls] and "scp" not in [c[3] for c in calls]


def test_stop_signals_the_job_on_every_worker(fake_gcloud):
    (fake_gcloud.state / "created").touch()
    result, calls = fake_gcloud("--stop", "my-tpu", "us-east5-a")
    assert result.returncode == 0, result.stderr
    ssh = [c for c in calls if c[3] == "ssh"]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    assert "kill -TERM" in ssh[0][ssh[0].index("--command") + 1]


def test_the_workers_command_runs_under_a_posix_sh(fake_gcloud, tmp_path):
    """The job line each worker's login shell runs: `.` not `source`, so a `sh` (dash) shell runs it."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "sama-train"
    fake.write_text('#!/bin/sh\necho "trained with $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (repo / ".venv" / "bin" / "activate").write_text(f'PATH="{repo}/.venv/bin:$PATH"\n')
    result, calls = fake_gcloud("--code=none", "my-tpu", "us-east5-a", "--", *COMMAND, REPO_DIR=str(repo))
    assert result.returncode == 0, result.stderr
    job = next(c[c.index("--command") + 1] for c in calls if "--worker=0" in c)
    ran = subprocess.run(["/bin/sh", "-c", job], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"trained with {' '.join(COMMAND[1:])}"
