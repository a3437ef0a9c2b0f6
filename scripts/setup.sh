#!/usr/bin/env bash
# Installs everything keyraft needs to build, run and test, from Debian's
# packages. Idempotent: installs only what is missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  librocksdb-dev libuv1-dev libssl-dev libprotobuf-c-dev protobuf-c-compiler
  libraft-dev softhsm2 libsofthsm2-dev opensc p11-kit libp11-kit-dev
  libcmocka-dev libjansson-dev libinih-dev libgfshare-dev libmicrohttpd-dev
  openssl procps
  clang libclang-rt-14-dev
  etcd-server etcd-client libcurl4-openssl-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
