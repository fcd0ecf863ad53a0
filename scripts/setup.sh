#!/usr/bin/env bash
# Set up narsuite on a fresh Debian 12 machine (as root): the system tools the
# daemon and the network lab use, then narsuite itself with its test extras in
# a virtual environment (.venv in this checkout, or $NARSUITE_VENV).
#
# Why a virtual environment: Debian's own python3 is "externally managed"
# (PEP 668), so `pip install` into it is refused; a venv works the same on
# stock Debian and on images whose python3 is not Debian's.
#
# Idempotent: running it again only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

APT_PACKAGES=(
  python3 python3-venv python3-dev  # the interpreter, venv + ensurepip (Debian splits it out), headers
  gcc libffi-dev libssl-dev  # for any dependency without a wheel on this architecture
  ca-certificates   # pip over HTTPS
  iproute2          # ip netns / veth / routes: the network lab and TUN routes
  nftables          # NAT in the lab; the roles' packet steering
  conntrack         # inspecting the lab NAT's UDP mappings
  openssh-client    # ssh + ssh-keygen: manhole tests log in for real
  openssl           # the openssl command: certificate tests check our PKI with it
  curl              # metrics scrapes, SOCKS client
  ncat              # SOCKS5 client (half-close tests)
  netcat-openbsd    # nc -X 5: SOCKS5 client (half-close tests)
  iputils-ping      # ping through TUN devices
  procps            # sysctl
  netbase           # /etc/protocols and /etc/services: `ip rule ... ipproto udp` resolves names there
  util-linux        # unshare, mount: charon gets its own /run
  kmod
  tshark            # dissector check: what we put on the wire parses without malformed packets
  strongswan-charon         # the real IKE/ESP peer of the ike role's lab tests and benchmarks
  strongswan-swanctl        # its vici control tool
  libstrongswan-standard-plugins  # its openssl plugin: ECP groups and AES-GCM (only a Recommends)
  libcharon-extra-plugins   # kernel-libipsec (the kernel here has no in-kernel ESP)
  libcharon-extauth-plugins # xauth-generic
  redis-server              # the shared store ([store] backend = "redis") and its tests
  redis-sentinel            # Redis primary failover in the cluster tests
  keepalived                # VRRP: the gateway address follows a live node (cluster failover tests)
  libnss3-tools             # certutil: Libreswan's NSS database (pluto itself and its libraries: below)
)
# A machine without /etc/hosts (a debootstrap root, some containers) gets the standard one:
# `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over it, and fails when it is absent.
[ -e /etc/hosts ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer for it.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Libreswan 4.10, the second independent IKEv2 peer of the lab (tests/test_ikev2_lab.py): it
# conflicts with strongSwan in apt, so its .deb is unpacked into /opt/libreswan and pluto runs
# from there (narsuite/lab/libreswan.py binds it over /usr/libexec in a private mount namespace).
# The libraries pluto links against are the lib* packages of the .deb's own Depends (read
# from it, so a new Libreswan build brings its own list): installed, they conflict with nothing.
LIBRESWAN=${NARSUITE_LIBRESWAN:-/opt/libreswan}
if [ ! -x "$LIBRESWAN/usr/libexec/ipsec/pluto" ] || [ ! -e "$LIBRESWAN/.libraries-installed" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq libreswan && dpkg-deb -x libreswan_*.deb "$LIBRESWAN" \
     && dpkg-deb -f libreswan_*.deb Depends >depends)
  mapfile -t libs < <(tr ',' '\n' <"$tmp/depends" | sed -E 's/\|.*//; s/\(.*\)//; s/[[:space:]]//g' | grep '^lib')
  rm -rf "$tmp"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${libs[@]}" >/dev/null
  touch "$LIBRESWAN/.libraries-installed"
fi

# The interpreter the venv is built from: $PYTHON, else python3 on PATH (Debian's
# /usr/bin/python3 on a stock machine).
PY=${PYTHON:-python3}
VENV=${NARSUITE_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# compat editable mode: twistd finds twisted/plugins/narsuite_plugin.py in this
# checkout (a plain `pip install .` works too, see tests/test_packaging.py).
if ! "$VPY" -c 'import narsuite, pytest, twisted.plugins.narsuite_plugin' 2>/dev/null \
   || [ setup.cfg -nt "$VENV/.narsuite-installed" ]; then
  "$VPY" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
  touch "$VENV/.narsuite-installed"
fi

# Operators' commands on PATH (the daemon itself is $VENV/bin/twistd, see README).
for tool in narctl narsuite-lab narsuite-nar-client; do
  link=/usr/local/bin/$tool
  if [ ! -e "$link" ] || [ -L "$link" ]; then
    ln -sfn "$VENV/bin/$tool" "$link" 2>/dev/null || true
  fi
done

# Fail here, not in the middle of the tests, if a required piece is still missing.
"$VPY" - <<'EOF'
import sys
from narsuite.lab.strongswan import strongswan_unavailable_reason
reason = strongswan_unavailable_reason()
if reason:
    sys.exit(f"setup.sh: strongSwan is not usable: {reason}")
EOF
