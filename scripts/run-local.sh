#!/usr/bin/env bash
# Builds keyraft and runs a local node on its embedded default: data in
# ${KEYRAFT_DATA:-./keyraft-data} (SoftHSM token, CA and certificates made on
# first run), clients on 127.0.0.1:7300. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target keyraftd keyraft-cli
data="${KEYRAFT_DATA:-$PWD/keyraft-data}"
if [ ! -f "$data/keyraftd.conf" ]; then
  build/keyraftd init --data "$data"
fi
cat <<TXT

keyraft node starting; data in $data
In another shell:
  export PATH=$PWD/build:\$PATH KEYRAFT_CONFIG=$data/client.conf
  keyraft status
  id=\$(keyraft create --name demo --alg aes-256)
  echo hello | keyraft encrypt \$id | keyraft decrypt
  keyraft --config $data/auditor.conf audit tail     # the audit trail (auditor)
  keyraft --config $data/admin.conf principal list   # who may do what (admin)

TXT
exec build/keyraftd --data "$data"
