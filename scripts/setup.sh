#!/usr/bin/env bash
# Set up narsuite on a fresh Debian 12 machine (as root): the system tools the
# daemon and the network lab use, then narsuite itself with its test extras.
# Idempotent: running it again only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2          # ip netns / veth / routes: the network lab and TUN routes
  nftables          # NAT in the lab; the roles' packet steering
  conntrack         # inspecting the lab NAT's UDP mappings
  openssh-client    # ssh + ssh-keygen: manhole tests log in for real
  curl              # metrics scrapes, SOCKS client in later roles
  iputils-ping      # ping through TUN devices
  procps            # sysctl
  kmod
  tshark            # dissector check: what we put on the wire parses without malformed packets
  strongswan-charon         # the real IKE/ESP peer of the ike role's lab tests and benchmarks
  strongswan-swanctl        # its vici control tool
  libcharon-extra-plugins   # kernel-libipsec (the kernel here has no in-kernel ESP)
  libcharon-extauth-plugins # xauth-generic
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# compat editable mode: twistd finds twisted/plugins/narsuite_plugin.py in this
# checkout (a plain `pip install .` works too, see tests/test_packaging.py).
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
