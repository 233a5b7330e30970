"""The deepspeed launcher across two "nodes" (`--hostfile` with two host names of this machine, reached over ssh by
pdsh, as on a cluster) trains on 2 ranks and follows the one-process loss curve. Needs sshd and pdsh (.ci/run
installs them and sets EBWM_REQUIRE_SSHD so that their absence fails there instead of skipping)."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.distributed import free_port
from tests.helpers import assert_same_curve, train_launched

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ssh_to_this_machine(tmp_path_factory):
    """An sshd on 127.0.0.1 that accepts a fresh key, and an `ssh` first on PATH that uses it for the host names
    localhost and vm-local; yields the environment to launch with."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or shutil.which("pdsh") is None or os.geteuid() != 0:
        reason = "needs root, sshd and pdsh (Debian: openssh-server pdsh; .ci/run installs them)"
        if os.environ.get("EBWM_REQUIRE_SSHD"):
            pytest.fail(reason)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("ssh")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\nAuthorizedKeysFile {home}/authorized_keys\n"
        f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {home}/sshd.pid\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory sshd insists on
    subprocess.run([sshd, "-f", str(home / "sshd_config"), "-E", str(home / "sshd.log")], check=True)
    (home / "ssh_config").write_text(
        f"Host localhost vm-local\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {home}/user_key\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {home}/ssh_config "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PDSH_RCMD_TYPE": "ssh"}
    yield env, home
    subprocess.run(["kill", (home / "sshd.pid").read_text().strip()], check=False)


def test_deepspeed_hostfile_launch_over_ssh_matches_one_process(ssh_to_this_machine, tmp_path):
    env, home = ssh_to_this_machine
    hostfile = home / "hostfile"
    hostfile.write_text("localhost slots=1\nvm-local slots=1\n")
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    one = train_launched([[sys.executable]], tmp_path / "one", "data.micro_batch_size=8")
    nodes = train_launched([launcher], tmp_path / "nodes", "data.micro_batch_size=4", env=env)
    assert_same_curve(nodes, one)
