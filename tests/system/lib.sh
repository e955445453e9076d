# Shared helpers of the full-system tests (sourced, not run): logging, bounded waits, free
# loopback ports, and the host packages the tests need. Every wait here polls a condition until
# a deadline; nothing sleeps in the hope that something happened.

# The repository's root.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Where images and downloaded kernels are kept between runs.
cache_root=${EDGE_SYSTEM_CACHE:-/var/cache/edge-agent-system}
# The Debian mirror the images and kernels come from (Debian's archive only).
mirror=${EDGE_SYSTEM_MIRROR:-http://deb.debian.org/debian}
suite=bookworm

# A line of the test's log, grep-able: "SYSTEM-TEST: ...".
say() { echo "SYSTEM-TEST: $*"; }

# Fails the test with a reason (the caller's EXIT trap prints the diagnostics).
die() {
  echo "SYSTEM-TEST: FAILED: $*" >&2
  exit 1
}

# Seconds since the epoch.
now() { date +%s; }

# wait_until SECONDS WHAT CMD...: runs CMD every second until it succeeds; fails the test
# after SECONDS with WHAT.
wait_until() {
  local limit=$1 what=$2
  shift 2
  local deadline=$(($(now) + limit))
  until "$@"; do
    (($(now) < deadline)) || die "timed out after ${limit} s waiting for $what"
    sleep 1
  done
}

# A loopback TCP port nothing listens on, below the kernel's ephemeral range (32768 and up) so
# that no outgoing connection is handed it while a broker on it is stopped.
free_port() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    port = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free loopback port")
PY
}

# Whether something accepts TCP connections on the loopback port $1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Installs the Debian packages given that are missing (as root, or with sudo).
need_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "tests/system: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Why KVM cannot run a stock x86_64 guest here; nothing when it can. It can when it is not
# switched off with EDGE_SYSTEM_NO_KVM=1, /dev/kvm answers, and the CPU has hardware
# virtualization (VMX or SVM). A /dev/kvm without them (for instance kvm-pvm, the pagetable-based
# KVM of some cloud sandboxes) runs only guests built for it: QEMU aborts with `-cpu host`
# (MSR 0x10a) and a Debian kernel hangs otherwise.
kvm_why_not() {
  if [ "${EDGE_SYSTEM_NO_KVM:-0}" = 1 ]; then echo "EDGE_SYSTEM_NO_KVM=1"
  elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then echo "no /dev/kvm this user can open"
  elif ! grep -qwE 'vmx|svm' /proc/cpuinfo; then echo "/dev/kvm without VMX/SVM (paravirtual KVM)"
  elif ! python3 -c 'import fcntl, os; fcntl.ioctl(os.open("/dev/kvm", os.O_RDWR), 0xAE00)' 2>/dev/null; then
    echo "/dev/kvm does not answer KVM_GET_API_VERSION"
  fi
}

# Whether the QEMU started as $qemu_pid has exited.
qemu_gone() { ! kill -0 "$qemu_pid" 2>/dev/null; }
