"""launch.sh: argument checking, the gcloud commands of tpu mode, and local mode's process
management (start N, forward flags, stop everyone when one fails or on SIGTERM). The trainer
is replaced by a fake `python` so these run in seconds; real multi-process training is
tested elsewhere."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.util import default_sigint

pytestmark = pytest.mark.slow

LAUNCH = Path(__file__).resolve().parents[1] / "launch.sh"

# Stands in for `python`: `-c` (the port picker) goes to the real interpreter; a trainer run
# records its argv and pid under $FAKE_OUT and then behaves as $FAKE_MODE says.
FAKE_PYTHON = f"""\
#!{sys.executable}
import json, os, signal, sys, time
if sys.argv[1] == "-c":
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
args = sys.argv[1:]
i = int(next(a for a in args if a.startswith("--process_id=")).split("=", 1)[1])
out = os.environ["FAKE_OUT"]
mode = os.environ.get("FAKE_MODE", "ok")

def on_term(*_):
    open(os.path.join(out, f"term_{{i}}"), "w").close()
    sys.exit(143)

signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore_term" and i == 0 else on_term)
with open(os.path.join(out, f"args_{{i}}.json"), "w") as f:
    json.dump(args, f)
with open(os.path.join(out, f"pid_{{i}}"), "w") as f:
    f.write(str(os.getpid()))
print(f"hello from {{i}}", flush=True)
if mode == "ok":
    sys.exit(0)
if mode in ("fail1", "ignore_term") and i == 1:
    # Fail only once process 0 runs with its handler installed (it writes its pid after that):
    # on a loaded machine it may start later than this one.
    for _ in range(400):
        if os.path.exists(os.path.join(out, "pid_0")):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    sys.exit(3)
time.sleep(60)  # a process blocked forever in a collective
"""

# Stands in for `gcloud`: appends its argv, one per line, then '---', to $GCLOUD_LOG and
# keeps a copy of any tarball it is asked to scp.
FAKE_GCLOUD = """\
#!/usr/bin/env bash
printf '%s\\n' "$@" --- >> "$GCLOUD_LOG"
for a in "$@"; do [[ $a == *.tgz ]] && cp "$a" "$(dirname "$GCLOUD_LOG")/copied.tgz"; done
exit 0
"""


def write_exe(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


def is_alive(pid):
    """True while `pid` runs; a zombie (killed, not yet reaped) counts as dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def fake_python(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    exe = write_exe(tmp_path / "python", FAKE_PYTHON)
    env = dict(os.environ, PYTHON=str(exe), FAKE_OUT=str(out), LAUNCH_GRACE_S="2")
    return env, out


@pytest.fixture
def fake_gcloud(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_exe(bindir / "gcloud", FAKE_GCLOUD)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log))
    return env, log


def gcloud_calls(log):
    """The recorded gcloud invocations, each as its argv list."""
    return [c.strip("\n").split("\n") for c in log.read_text().split("---\n") if c.strip()]


def run(args, env, timeout=45):
    return subprocess.run([str(LAUNCH), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,error",
    [
        ([], "no mode: pass local, tpu or tpu-setup"),
        (["nonsense"], "unknown mode 'nonsense': pass local, tpu or tpu-setup"),
        (["--dry_run"], "no mode: pass local, tpu or tpu-setup"),
        (["local"], "local N: N='' is not a number of processes"),
        (["local", "abc"], "local N: N='abc' is not a number of processes"),
        (["local", "0"], "local N: N='0' is not a number of processes"),
        (["local", "2", "-d", "x"], "-d K: K='x' is not a number of CPU devices per process"),
        (["local", "2", "--dry_run"], "--dry_run is for tpu and tpu-setup: local runs nothing remote"),
        (["tpu"], "tpu needs TPU_NAME and ZONE before main's flags (got 0 argument(s))"),
        (["tpu", "--dry_run"], "tpu needs TPU_NAME and ZONE before main's flags (got 0 argument(s))"),
        (["tpu", "name-only"], "tpu needs TPU_NAME and ZONE before main's flags (got 1 argument(s))"),
        (["tpu", "--dry_run", "", ""], "TPU_NAME='' is not a TPU name: lowercase letters, digits and hyphens"),
        (["tpu", "My_TPU", "z"], "TPU_NAME='My_TPU' is not a TPU name"),
        (["tpu", "t", ""], "ZONE='' is not a zone (e.g. us-central2-b); it comes right after TPU_NAME"),
        (["tpu", "t", "--workdir=r"], "ZONE='--workdir=r' is not a zone"),
        (["tpu", "t", "z", "--dry_run=yes"], "--dry_run takes no value (got '--dry_run=yes')"),
        (["tpu-setup", "name-only"], "tpu-setup takes TPU_NAME ZONE [REPO_URL] (got 1 argument(s))"),
        (["tpu-setup", "t", "z", "url", "more"], "tpu-setup takes TPU_NAME ZONE [REPO_URL] (got 4 argument(s))"),
        (["tpu-setup", "--dry_run", "t", ""], "ZONE='' is not a zone"),
    ],
)
def test_bad_arguments_print_usage_then_one_error_line_and_exit_2(fake_gcloud, args, error):
    env, log = fake_gcloud
    result = run(args, env)
    assert result.returncode == 2
    assert result.stderr.startswith("usage:")
    *text, last = result.stderr.splitlines()
    assert last.startswith(f"error: {error}"), last
    assert not any(line.startswith("error:") for line in text)
    assert result.stdout == "" and not log.exists()


def test_tpu_mode_runs_main_distributed_on_all_workers_with_flags_quoted(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    flags = [
        "--config=configs/mtp3.py:nano_125m",
        "--config.data.source=/tmp/a b",
        '--workdir=gs://bucket/run\'s "x"',
        "--config.name=$HOME;rm -rf /",
    ]
    result = run(["tpu", "my-tpu", "us-central2-b", *flags], env)
    assert result.returncode == 0, result.stderr

    [call] = gcloud_calls(log)
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    [command] = [a.removeprefix("--command=") for a in call if a.startswith("--command=")]
    prefix = "cd ~/mtp_jax && python3 -m mtp_jax.main --distributed "
    assert command.startswith(prefix)
    # The worker's shell must see exactly the flags we passed, one argument each.
    echoed = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + command.removeprefix(prefix)], capture_output=True, text=True, check=True
    ).stdout
    assert echoed.split("\0")[:-1] == flags


def test_tpu_mode_without_flags_passes_no_empty_argument(fake_gcloud):
    env, log = fake_gcloud
    assert run(["tpu", "t", "z"], env).returncode == 0
    [call] = gcloud_calls(log)
    assert call[-1] == "--command=cd ~/mtp_jax && python3 -m mtp_jax.main --distributed"


def test_tpu_setup_with_repo_url_clones_and_installs_on_all_workers(fake_gcloud):
    env, log = fake_gcloud
    assert run(["tpu-setup", "t", "z", "https://example.com/mtp_jax.git"], env).returncode == 0
    [call] = gcloud_calls(log)
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=all"]
    assert call[7] == (
        "--command=(git clone https://example.com/mtp_jax.git ~/mtp_jax"
        " || git -C ~/mtp_jax pull --ff-only)"
        " && cd ~/mtp_jax && python3 -m pip install -e '.[tpu]'"
    )


def test_tpu_setup_without_repo_copies_working_tree_then_installs(fake_gcloud, tmp_path):
    env, log = fake_gcloud
    result = run(["tpu-setup", "t", "z"], env)
    assert result.returncode == 0, result.stderr
    scp, ssh = gcloud_calls(log)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["t:", "--zone=z", "--worker=all"]
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=all"]
    assert ssh[7] == (
        "--command=mkdir -p ~/mtp_jax && tar -xzf ~/mtp_jax.tgz -C ~/mtp_jax"
        " && cd ~/mtp_jax && python3 -m pip install -e '.[tpu]'"
    )
    with tarfile.open(tmp_path / "copied.tgz") as tgz:
        names = tgz.getnames()
    assert "launch.sh" in names and "pyproject.toml" in names
    assert not any(n.startswith(".git/") for n in names)


def printed_commands(stdout):
    """The command lines a --dry_run printed (comments skipped), each as the argv bash reads from it."""
    return [
        subprocess.run(
            ["bash", "-c", "printf '%s\\0' " + line], capture_output=True, text=True, check=True
        ).stdout.split("\0")[:-1]
        for line in stdout.splitlines()
        if not line.startswith("#")
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["tpu", "my-tpu", "us-central2-b", "--config=configs/mtp3.py:1b", "--workdir=gs://b/run's x"],
        ["tpu", "t", "z"],
        ["tpu-setup", "t", "z", "https://example.com/mtp_jax.git"],
    ],
)
def test_dry_run_anywhere_prints_exactly_the_gcloud_commands_it_would_run(fake_gcloud, args):
    env, log = fake_gcloud
    dry_runs = [run([*args[:i], "--dry_run", *args[i:]], env) for i in range(len(args) + 1)]
    assert all(dry.returncode == 0 for dry in dry_runs), [dry.stderr for dry in dry_runs]
    assert not log.exists()  # nothing ran, wherever --dry_run stood
    assert run(args, env).returncode == 0
    expected = [["gcloud", *call] for call in gcloud_calls(log)]
    assert all(printed_commands(dry.stdout) == expected for dry in dry_runs)


def test_dry_run_of_setup_from_the_working_tree_prints_the_copy_and_the_install(fake_gcloud):
    env, log = fake_gcloud
    dry = run(["tpu-setup", "--dry_run", "t", "z"], env)
    assert dry.returncode == 0, dry.stderr
    assert not log.exists()
    scp, ssh = printed_commands(dry.stdout)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5].endswith("/mtp_jax.tgz")
    assert scp[6:] == ["t:", "--zone=z", "--worker=all"]
    assert ssh[-1].endswith("python3 -m pip install -e '.[tpu]'")


def test_local_mode_starts_n_processes_with_shared_port_and_forwarded_flags(fake_python):
    env, out = fake_python
    flags = ["--config=configs/mtp3.py:tiny", "--config.data.source=/tmp/a b", "--workdir=r"]
    result = run(["local", "3", "-d", "2", *flags], env)
    assert result.returncode == 0, result.stderr

    argvs = [json.loads((out / f"args_{i}.json").read_text()) for i in range(3)]
    port = argvs[0][2].removeprefix("--coordinator_address=127.0.0.1:")
    assert 0 < int(port) < 65536
    for i, argv in enumerate(argvs):
        assert argv == [
            "-m",
            "mtp_jax.main",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=3",
            f"--process_id={i}",
            "--cpu_devices=2",
            *flags,
        ]
    # Process 0 owns stdout; the others are on stderr, prefixed.
    assert result.stdout == "hello from 0\n"
    assert "[process 1] hello from 1\n" in result.stderr
    assert "[process 2] hello from 2\n" in result.stderr


def test_local_mode_defaults_to_one_cpu_device_per_process(fake_python):
    env, out = fake_python
    assert run(["local", "1", "--workdir=r"], env).returncode == 0
    argv = json.loads((out / "args_0.json").read_text())
    assert argv[3:] == ["--num_processes=1", "--process_id=0", "--cpu_devices=1", "--workdir=r"]


def test_local_mode_failure_stops_a_hung_process_and_exits_nonzero(fake_python):
    env, out = fake_python
    start = time.monotonic()
    result = run(["local", "2"], dict(env, FAKE_MODE="fail1"))
    assert time.monotonic() - start < 30  # not the 60 s process 0 would hang for (slack for a loaded machine)
    assert result.returncode == 3
    assert "launch.sh: process 1 exited with status 3; stopping the others" in result.stderr
    assert (out / "term_0").exists()  # process 0 got SIGTERM
    assert wait_for(lambda: not is_alive(int((out / "pid_0").read_text())), 2)


def test_local_mode_kills_a_process_that_ignores_sigterm_after_the_grace_period(fake_python):
    env, out = fake_python
    start = time.monotonic()
    result = run(["local", "2"], dict(env, FAKE_MODE="ignore_term", LAUNCH_GRACE_S="1"))
    elapsed = time.monotonic() - start
    assert result.returncode == 3
    assert 1 <= elapsed < 30  # the grace period, then KILL: not process 0's 60 s
    assert not (out / "term_0").exists()
    assert wait_for(lambda: not is_alive(int((out / "pid_0").read_text())), 2)


def start_two_hanging_processes(env, out, stderr_path, **popen_kwargs):
    """launch.sh local 2 with processes that sleep until signalled; returns once both run
    and process 1's output has come through the prefixer (so it streams, not buffers)."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [str(LAUNCH), "local", "2"],
            env=dict(env, FAKE_MODE="hang"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=default_sigint,
            **popen_kwargs,
        )
    assert wait_for(lambda: "[process 1] hello from 1\n" in stderr_path.read_text(), 10)
    # Process 0 may start later than process 1 on a loaded machine: wait for it too.
    assert wait_for(lambda: all((out / f"pid_{i}").exists() for i in range(2)), 10)
    return proc


def assert_both_processes_got_sigterm_and_ended(out):
    for i in range(2):
        assert (out / f"term_{i}").exists()
        assert wait_for(lambda: not is_alive(int((out / f"pid_{i}").read_text())), 2)  # noqa: B023


def test_sigterm_to_launcher_is_forwarded_to_all_processes(fake_python, tmp_path):
    env, out = fake_python
    proc = start_two_hanging_processes(env, out, tmp_path / "stderr")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "launch.sh: terminated" in (tmp_path / "stderr").read_text()
    assert_both_processes_got_sigterm_and_ended(out)


def test_ctrl_c_stops_all_processes(fake_python, tmp_path):
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group, in which the
    # (non-interactive shell's) children ignore it: the launcher must stop them itself.
    env, out = fake_python
    proc = start_two_hanging_processes(env, out, tmp_path / "stderr", start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "launch.sh: interrupted" in (tmp_path / "stderr").read_text()
    assert_both_processes_got_sigterm_and_ended(out)
