#!/usr/bin/env bash
# What a new machine sees: build a bare Debian 12 root with debootstrap, put a clean
# clone of this checkout's HEAD in it, and run the README's two commands inside
# (chroot in a private mount namespace, with /proc, /sys, /dev and a fresh /run).
#
#   bash scripts/fresh-check.sh [--keep] [--dir DIR] [--only run|test] [-- PYTEST-ARGS...]
#
# Run it (as root) before every stop that changes dependencies.  It catches what CI on
# a developer's own machine cannot: a package that is only there because someone
# installed it by hand, a pip that PEP 668 refuses, a tool found only on our PATH.
#
# Commands are taken from README.md, not written here, so the check runs exactly what the
# README tells operators.  The daemon command runs until `narctl status` answers (it would
# run forever otherwise), then it is stopped; the test command must exit 0.
# Extra arguments after `--` are appended to the test command (e.g. `-- -x tests/test_store.py`).
# Environment: MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEEP=0
ONLY=all
DIR=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --dir) DIR=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fresh-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
DIR=${DIR:-/var/tmp/narsuite-fresh.$$}
LOG=${DIR}.log

if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# The two commands, as the README prints them (indented, starting with the setup script).
mapfile -t CMDS < <(grep -E '^    bash scripts/setup.sh && ' "$ROOT/README.md" | sed 's/^    //')
[ "${#CMDS[@]}" = 2 ] || { echo "fresh-check: expected two 'bash scripts/setup.sh && ...' commands in README.md, found ${#CMDS[@]}" >&2; exit 2; }
RUN_CMD=${CMDS[0]}
TEST_CMD=${CMDS[1]}
if [ "${#EXTRA[@]}" -gt 0 ]; then TEST_CMD="$TEST_CMD ${EXTRA[*]}"; fi

cleanup() {
  # Processes still inside the root (a daemon the check started) are ours: stop them.
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$DIR" ]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  if [ "$KEEP" = 0 ] && [ -d "$DIR" ]; then
    if grep -q " $DIR" /proc/self/mountinfo; then
      echo "fresh-check: mounts remain under $DIR; not removing it" >&2
    else
      rm -rf "$DIR"
    fi
  fi
}
trap cleanup EXIT

t0=$(date +%s)
echo "fresh-check: debootstrap --variant=minbase $SUITE $DIR (log: $LOG)"
debootstrap --variant=minbase "$SUITE" "$DIR" "$MIRROR" >"$LOG" 2>&1 \
  || { tail -20 "$LOG"; echo "fresh-check: debootstrap failed" >&2; exit 1; }
# A stock machine also has the updates and security suites.
cat >"$DIR/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
cp /etc/resolv.conf "$DIR/etc/resolv.conf"
# The one host setting that goes in: the CA bundle this host trusts.  Where the network
# intercepts TLS (as here) pip could not reach PyPI without it; elsewhere it is just
# the public CAs again.
cp /etc/ssl/certs/ca-certificates.crt "$DIR/root/host-ca.pem"
git clone -q --no-hardlinks "$ROOT" "$DIR/root/narsuite"
echo "fresh-check: bare root ready in $(( $(date +%s) - t0 )) s; narsuite at $(git -C "$ROOT" rev-parse --short HEAD) (committed HEAD only)"

# Inside: no environment from this machine (its PIP_* settings, PATH, pyenv) leaks in.
INNER=$(cat <<EOF
set -u
cd /root/narsuite
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export PIP_CERT=/root/host-ca.pem
rc=0
if [ "$ONLY" != test ]; then
  echo "fresh-check: [1/2] $RUN_CMD"
  setsid /bin/bash -c "$RUN_CMD" > /root/run.log 2>&1 &
  daemon=\$!
  up=0
  for i in \$(seq 1 600); do
    if ! kill -0 \$daemon 2>/dev/null; then break; fi
    if [ -x /usr/local/bin/narctl ] && narctl status >/root/status.txt 2>&1; then up=1; break; fi
    sleep 1
  done
  if [ \$up = 1 ]; then
    echo "fresh-check: [1/2] daemon up, narctl status answered:"; sed 's/^/    /' /root/status.txt | head -20
  else
    echo "fresh-check: [1/2] FAILED: the daemon did not answer narctl status"; tail -40 /root/run.log; rc=1
  fi
  # its own process group (setsid): stop exactly what the command started
  kill -TERM -- -\$daemon 2>/dev/null; sleep 3; kill -KILL -- -\$daemon 2>/dev/null
  wait \$daemon 2>/dev/null
fi
if [ "$ONLY" != run ]; then
  echo "fresh-check: [2/2] $TEST_CMD"
  if /bin/bash -c "$TEST_CMD" > /root/test.log 2>&1; then
    echo "fresh-check: [2/2] passed: \$(grep -E '^[=]+ .* in [0-9.]+s' /root/test.log | tail -1)"
  else
    echo "fresh-check: [2/2] FAILED"; grep -E '^(FAILED|ERROR)|^[=]+ .* in ' /root/test.log | tail -40; rc=1
  fi
fi
exit \$rc
EOF
)
set +e
unshare --mount --propagation private -- /bin/bash -c '
  set -e
  D=$1
  mount --bind "$D" "$D"  # the root must be a mount point: `ip -n` makes / an rslave mount
  mount -t proc proc "$D/proc"
  mount --rbind /sys "$D/sys"
  mount --rbind /dev "$D/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$D/run"
  exec chroot "$D" /usr/bin/env -i /bin/bash -c "$2"
' fresh-check "$DIR" "$INNER"
rc=$?
set -e
echo "fresh-check: $([ $rc = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - t0 )) s (logs in the root: /root/run.log, /root/test.log$([ "$KEEP" = 1 ] && echo "; kept at $DIR" || echo "; use --keep to look"))"
exit $rc
