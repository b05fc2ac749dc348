#!/usr/bin/env bash
# Installs the Debian packages gqe needs to build and test, and only those that are missing.
# Safe to run again and again: when everything is present it does nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tools/install-deps.sh [--sanitizers] [--python] [--bench] [--backends] [--help]

Installs the missing Debian packages for building gqe and running its tests:
  build-essential g++ cmake pkgconf libeigen3-dev nlohmann-json3-dev libcli11-dev libgtest-dev
  libbenchmark-dev

  --sanitizers  also clang-14 and libclang-rt-14-dev (AddressSanitizer, UBSan, libFuzzer)
  --python      also python3-numpy and python3-torch (the float64 reference in tools/ and the
                PyTorch bridge in python/)
  --bench       also libopenblas-dev gnuplot-nox python3-numpy (benchmarks and their plots)
  --backends    also libopenblas-dev and libdnnl-dev (the GEMM backends: -DGQE_GEMM=openblas|onednn)
  --help        print this text

Runs apt-get as root, or through sudo when run by another user.
EOF
}

packages=(build-essential g++ cmake pkgconf libeigen3-dev nlohmann-json3-dev libcli11-dev libgtest-dev
          libbenchmark-dev)
for arg in "$@"; do
  case "$arg" in
    --sanitizers) packages+=(clang-14 libclang-rt-14-dev) ;;  # the runtime is only recommended by clang
    --python) packages+=(python3-numpy python3-torch) ;;
    --bench) packages+=(libopenblas-dev gnuplot-nox python3-numpy) ;;
    --backends) packages+=(libopenblas-dev libdnnl-dev) ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install-deps.sh: error: unknown option '$arg'; expected --sanitizers, --python, --bench, --backends or --help" >&2; exit 2 ;;
  esac
done

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps.sh: this script needs a Debian-based system (dpkg and apt-get);" \
       "install these packages or their equivalents yourself: ${packages[*]}" >&2
  exit 1
fi

missing=()
declare -A seen=()
for pkg in "${packages[@]}"; do
  [[ -n "${seen[$pkg]:-}" ]] && continue
  seen[$pkg]=1
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-deps.sh: missing packages (${missing[*]}) and not root, and sudo is not" \
         "available; run this script as root" >&2
    exit 1
  fi
fi

echo "install-deps.sh: installing ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
apt_opts=(-o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
if ! "${sudo[@]}" apt-get "${apt_opts[@]}" update -qq >"$log" 2>&1 ||
   ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq \
       --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
  cat "$log" >&2
  echo "install-deps.sh: apt-get failed" >&2
  exit 1
fi
