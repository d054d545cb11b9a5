#!/usr/bin/env bash
# System packages the tests need beyond Python: shellcheck (the Slurm scripts are linted) and a real
# Slurm with munge (the Slurm tests start slurmctld + slurmd on localhost). Debian's packages, via apt.
#
#   scripts/setup_system.sh        # installs what is missing; a no-op when everything is there
#
# Needs root (or passwordless sudo) and apt. The daemons are not started here: each test run starts its
# own, configured in a temporary directory, and stops them.
set -euo pipefail

need=()
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
if ((${#need[@]} == 0)); then
  echo "setup_system: shellcheck, slurm and munge are installed"
  exit 0
fi

sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "setup_system: need root or sudo to install: ${need[*]}" >&2; exit 1; }
  sudo=(sudo -n)
fi
command -v apt-get >/dev/null || { echo "setup_system: no apt-get; install by hand: ${need[*]}" >&2; exit 1; }
echo "setup_system: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# Debian's packages start their services on install; policy-rc.d keeps them stopped (tests run their own).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  created_policy=1
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if ((created_policy)); then
  "${sudo[@]}" rm -f "$policy"
fi
echo "setup_system: done"
