"""The Ansible roles: ansible-lint's production profile, a syntax check, and real runs on this machine.

The real run takes a throwaway host root (an HGX-shaped sysfs tree, the kernel's side played by FakeKernel)
and a network namespace of its own (the bridge, forwarding and routes are made there), connection local,
twice: the second run must change nothing. What cannot run here (GRUB, reboots, users, sshd, systemd: the
machine has no systemd and must not be changed) runs in check mode against this machine's real root, which
shows what would change, including the reboot, and changes nothing. The host agent's role, which needs a real root
(users, their home, sshd), also runs for real on this machine's own root, seen through overlays in a mount
namespace of its own, so that nothing of the machine changes: then sshd takes the result and a controller's
key forwards to the agent's socket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hosts import HGX_GPUS, hgx_h100, iommu_off
from hosttree import FakeKernel

ANSIBLE = Path(__file__).parents[1] / "ansible"
VENV = Path(sys.executable).parent.parent
ENV = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1",
       "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_LOCAL_TEMP": "/tmp/hearth-ansible-tmp", "COLUMNS": "200"}
pytestmark = [pytest.mark.slow, pytest.mark.root("the real run makes a network namespace")]


def playbook(*args: str, netns: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    argv = ["ansible-playbook", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, cwd=ANSIBLE, env=ENV, capture_output=True, text=True, timeout=timeout)


def recap(output: str) -> dict[str, int]:
    found = re.search(r"^\S+\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output, re.M)
    assert found, output[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, found.groups())))


def inventory(tmp_path: Path, root: Path, **extra) -> Path:
    """One host, this machine, already root (no sudo here), with every role's paths under `root`."""
    fake_vmm = tmp_path / "cloud-hypervisor-static"
    fake_vmm.write_text("#!/bin/sh\necho 'cloud-hypervisor v51.0'\n")  # a stand-in file: only its bytes matter
    fake_vmm.chmod(0o755)
    host = {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
        "hearth_host_root": str(root), "hearth_install_venv": str(VENV), "hearth_install_package": "hearth",
        "hearth_cloud_hypervisor_src": str(fake_vmm),
        "hearth_cloud_hypervisor_sha256": hashlib.sha256(fake_vmm.read_bytes()).hexdigest(),
        "hearth_kernel_hugepages_1g": 16, "hearth_network_subnet": "10.253.1.0/24",
        "hearth_network_underlay": "198.51.100.11",
        "hearth_network_extra_routes": [{"subnet": "10.253.2.0/24", "via": "198.51.100.12"}], **extra,
    }
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"hearth_hosts": {"hosts": {"ci": host}}}))
    return path


@pytest.fixture
def netns():
    """A network namespace with an underlay interface, so routes via other hosts resolve."""
    name = f"hth-ansible-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    for step in (["link", "set", "lo", "up"], ["link", "add", "under0", "type", "bridge"],
                 ["addr", "add", "198.51.100.11/24", "dev", "under0"], ["link", "set", "under0", "up"]):
        subprocess.run(["ip", "-n", name, *step], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=True)


def test_lint_with_the_production_profile():
    lint = subprocess.run(["ansible-lint", "--profile", "production", "--offline", "."], cwd=ANSIBLE, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr


def test_syntax_check():
    check = playbook("--syntax-check", "-i", "inventory/hosts.yml", "site.yml")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_real_run_prepares_the_host_and_a_second_changes_nothing(tmp_path, netns):
    root = tmp_path / "root"
    tree = hgx_h100(root)
    hosts = inventory(tmp_path, root)
    with FakeKernel(tree):  # serves the sysfs bind/unbind files that `hearth vfio bind` writes
        first = playbook("-i", str(hosts), "site.yml", netns=netns)
        assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
        second = playbook("-i", str(hosts), "site.yml", netns=netns)
        assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-2000:]
    assert recap(first.stdout)["changed"] >= 10
    assert recap(second.stdout) | {"ok": 0} == {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0}, second.stdout

    grub = (root / "etc/default/grub.d/hearth.cfg").read_text()
    assert "intel_iommu=on iommu=pt default_hugepagesz=1G hugepagesz=1G hugepages=16" in grub
    assert "The running kernel lacks default_hugepagesz=1G hugepagesz=1G hugepages=16" in second.stdout
    assert sorted(line.split()[0] for line in (root / "etc/hearth/vfio-pci.conf").read_text().splitlines()
                  if line and not line.startswith("#")) == sorted(HGX_GPUS)
    assert all(os.readlink(root / f"sys/bus/pci/devices/{gpu}/driver").endswith("vfio-pci") for gpu in HGX_GPUS)
    assert "softdep nvidia pre: vfio-pci" in (root / "etc/modprobe.d/hearth-vfio.conf").read_text()
    assert (root / "etc/systemd/system/hearth-vfio-bind.service").is_file()
    assert os.readlink(root / "usr/local/bin/cloud-hypervisor").endswith("cloud-hypervisor-v51.0")
    env = (root / "etc/hearth/agent.env").read_text()
    assert "--bridge hearth0 --subnet 10.253.1.0/24" in env
    assert "KillMode=process" in (root / "etc/systemd/system/hearth-agent.service").read_text()
    assert "AllowStreamLocalForwarding local" in (root / "etc/ssh/sshd_config.d/hearth.conf").read_text()

    def in_ns(*args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", netns, *args], capture_output=True, text=True).stdout

    bridge = json.loads(in_ns("ip", "-j", "addr", "show", "dev", "hearth0"))[0]
    assert "UP" in bridge["flags"] and any(a["local"] == "10.253.1.1" and a["prefixlen"] == 24 for a in bridge["addr_info"])
    assert "10.253.2.0/24 via 198.51.100.12" in in_ns("ip", "-4", "route", "show")
    assert in_ns("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"


def test_a_host_that_is_not_ready_fails_with_hearth_vfio_checks_words(tmp_path, netns):
    root = tmp_path / "root"
    iommu_off(root)
    result = playbook("-i", str(inventory(tmp_path, root)), "site.yml", netns=netns)
    assert result.returncode != 0
    assert "Fail with hearth vfio check's words" in result.stdout
    assert "IOMMU" in result.stdout and "intel_iommu=on" in result.stdout


def test_a_wrong_checksum_is_refused_and_nothing_stays(tmp_path, netns):
    root = tmp_path / "root"
    hgx_h100(root, gpu_driver="vfio-pci")
    result = playbook("-i", str(inventory(tmp_path, root, hearth_cloud_hypervisor_sha256="0" * 64)), "site.yml",
                      netns=netns)
    assert result.returncode != 0 and "not the pinned 000000" in result.stdout
    assert not (root / "usr/local/lib/hearth/cloud-hypervisor-v51.0").exists()
    unset = playbook("-i", str(inventory(tmp_path, root, hearth_cloud_hypervisor_sha256="")), "site.yml", netns=netns)
    assert unset.returncode != 0 and "set hearth_cloud_hypervisor_sha256" in unset.stdout


def test_check_mode_over_ssh_on_this_machine_shows_the_reboot_and_changes_nothing(tmp_path, sshd):
    """GRUB, the reboot, users, sshd and systemd only run on a real root: check mode, over SSH (the loopback
    sshd) as Ansible reaches a real host, against this machine's real root, which must not change."""
    hosts = inventory(tmp_path, Path("/"), hearth_agent_manage_system=True, ansible_connection="ssh",
                      ansible_host="127.0.0.1", ansible_port=sshd["port"], ansible_user=sshd["user"],
                      ansible_ssh_private_key_file=str(sshd["identity"]),
                      ansible_ssh_common_args=f"-o UserKnownHostsFile={sshd['known_hosts']} -o StrictHostKeyChecking=yes")
    before = {p: p.exists() for p in (Path("/etc/default/grub.d/hearth.cfg"), Path("/etc/hearth/agent.env"),
                                      Path("/etc/modprobe.d/hearth-vfio.conf"), Path("/usr/local/bin/cloud-hypervisor"))}
    result = playbook("--check", "--diff", "-i", str(hosts), "site.yml")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    handler = result.stdout.split("RUNNING HANDLER [hearth_kernel : Reboot into the new kernel command line]")[1]
    assert handler.split("\n\n")[0].strip().endswith("changed: [ci]")  # check mode: would reboot, does not
    assert re.search(r"TASK \[hearth_agent : Create the user controllers log in as\].*\n(--- .*\n)*changed: \[ci\]",
                     result.stdout)
    assert recap(result.stdout)["failed"] == 0
    assert {p: p.exists() for p in before} == before
    assert subprocess.run(["getent", "passwd", "hearth"], capture_output=True).returncode != 0


NAMESPACE_RUN = r"""
set -eu
work=$1
for dir in /etc /var/lib /usr/local /run; do  # this machine's own, seen through a writable layer that goes
    name=$(echo "$dir" | tr / _)                # with this mount namespace: the role writes there for real
    mkdir -p "$work/upper$name" "$work/work$name"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$work/upper$name,workdir=$work/work$name" "$dir"
done
cd "$2"
ansible-playbook -i "$work/inventory.json" "$work/agent.yml" > "$work/first.out" 2>&1 || { echo FAILED first; exit 1; }
ansible-playbook -i "$work/inventory.json" "$work/agent.yml" > "$work/second.out" 2>&1 || { echo FAILED second; exit 1; }
/usr/sbin/sshd -t > "$work/sshd-t.out" 2>&1 || { echo FAILED sshd -t; exit 1; }
# what the agent's unit makes at start: /run/hearth (root:hearth 0750) and the socket (0660); an echo stands in
install -d -m 0750 -g hearth /run/hearth
python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX); s.bind("/run/hearth/agent.sock")
os.chown("/run/hearth/agent.sock", 0, int(sys.argv[1])); os.chmod("/run/hearth/agent.sock", 0o660); s.listen()
while True:
    c, _ = s.accept(); c.sendall(c.recv(100).upper()); c.close()
' "$(getent group hearth | cut -d: -f3)" &
echo=$!
/usr/sbin/sshd -D -e -p "$3" -o ListenAddress=127.0.0.1 -o PidFile="$work/sshd.pid" > "$work/sshd.log" 2>&1 &
sshd=$!
echo READY > "$work/ready"
while [ ! -e "$work/done" ]; do sleep 0.1; done
kill $sshd $echo
id hearth > "$work/id.out"
stat -c '%n %U %G %a' /var/lib/hearth/home /var/lib/hearth/home/.ssh /var/lib/hearth/home/.ssh/authorized_keys > "$work/stat.out"
"""


def test_the_agent_role_runs_for_real_on_this_machines_root_and_lets_only_forwarding_in(tmp_path):
    """The hearth_agent role with what only a real root has (the group and user controllers log in as, their
    home and .ssh, the authorised keys, sshd's config), run for real on this machine's own root, seen through
    overlays in a mount namespace of its own so that the machine does not change: twice (the second changes
    nothing); sshd accepts the result; and a controller's key, logged in as that user, reaches the agent's
    socket through a forward and gets no shell."""
    import asyncio
    import socket as sockets

    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "controller_key").write_bytes(key.export_private_key())
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
            "hearth_host_root": "/", "hearth_install_venv": str(VENV), "hearth_install_package": "hearth",
            "hearth_network_subnet": "10.253.1.0/24",
            "hearth_agent_controller_keys": [key.export_public_key().decode().strip() + " controller@notebook"]}
    (tmp_path / "inventory.json").write_text(json.dumps({"hearth_hosts": {"hosts": {"ci": host}}}))
    (tmp_path / "agent.yml").write_text("- name: The host agent's role\n  hosts: hearth_hosts\n  roles:\n"
                                        "    - role: hearth_agent\n")
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = {p: p.exists() for p in (Path("/var/lib/hearth/home"), Path("/etc/hearth/agent.env"),
                                      Path("/etc/ssh/sshd_config.d/hearth.conf"))}
    inside = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", NAMESPACE_RUN, "run",
                               str(tmp_path), str(ANSIBLE), str(port)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "ready").exists():
            if inside.poll() is not None or time.monotonic() > deadline:
                out = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.out"))
                pytest.fail(f"{inside.stdout.read()}\n{out}")
            time.sleep(0.2)

        async def controller() -> tuple[bytes, int | None, str, str]:
            connection = await asyncssh.connect("127.0.0.1", port=port, username="hearth", client_keys=[key],
                                                known_hosts=None)
            async with connection:
                local = str(tmp_path / "fwd.sock")
                listener = await connection.forward_local_path(local, "/run/hearth/agent.sock")
                reader, writer = await asyncio.open_unix_connection(local)
                writer.write(b"hello agent")
                echoed = await asyncio.wait_for(reader.read(100), 10)
                writer.close()
                listener.close()
                shell = await connection.run("id", check=False)
                try:  # a TCP forward, to anywhere
                    await connection.open_connection("127.0.0.1", port)
                    tcp = "opened"
                except asyncssh.ChannelOpenError as error:
                    tcp = error.reason
                return echoed, shell.exit_status, shell.stdout + shell.stderr, tcp

        echoed, status, said, tcp = asyncio.run(controller())
    finally:
        (tmp_path / "done").touch()
        inside.wait(60)
    assert inside.returncode == 0, inside.stdout.read()
    first, second = (tmp_path / "first.out").read_text(), (tmp_path / "second.out").read_text()
    assert recap(first)["failed"] == 0 and recap(first)["changed"] >= 5, first[-3000:]
    assert recap(second) | {"ok": 0} == {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0}, second[-3000:]
    assert echoed == b"HELLO AGENT"  # the controller's key reached the agent's socket through the forward
    assert status != 0 and "This account is currently not available" in said  # and got no shell
    # OpenSSH ties Unix-socket forwards to AllowTcpForwarding local, and PermitOpen cannot name a socket path:
    # the controllers' key can forward TCP from the host too (the role's README says so). Pinned, so that a
    # change here is seen.
    assert tcp == "opened"
    modes = (tmp_path / "stat.out").read_text().splitlines()
    assert modes == ["/var/lib/hearth/home hearth hearth 750", "/var/lib/hearth/home/.ssh hearth hearth 700",
                     "/var/lib/hearth/home/.ssh/authorized_keys hearth hearth 600"], modes
    upper = tmp_path / "upper_etc"
    assert "hearth:" in (upper / "passwd").read_text() and (upper / "ssh/sshd_config.d/hearth.conf").is_file()
    assert {p: p.exists() for p in before} == before  # this machine's own root did not change
    assert subprocess.run(["getent", "passwd", "hearth"], capture_output=True).returncode != 0
