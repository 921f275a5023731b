#!/usr/bin/env bash
# Installs the Debian SLURM + munge packages used by tests/launch (a real single-node slurmctld + slurmd).
# Idempotent and quick: does nothing when the binaries are already there. CI runs it as root.
# The Debian postinst creates /etc/munge/munge.key; services are not started here (the tests start their
# own daemons with a generated config under a temp dir and stop them again).
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch srun scontrol munged; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ] && [ -f /etc/munge/munge.key ]; then
    echo "install_slurm: slurm + munge already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# slurmctld + slurmd + client tools + munge; not the full slurm-wlm metapackage (fewer plugins, faster).
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
if [ ! -f /etc/munge/munge.key ]; then
    $SUDO /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi
echo "install_slurm: installed $(slurmctld -V 2>/dev/null || echo slurm)"
