#!/usr/bin/env bash
# The test command README.md gives: installs prerequisites, then runs every test (unit, property,
# integration against real etcd / BIRD / GoBGP / FRR / kernel in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
scripts/install-deps.sh
scripts/validate-manifests.sh
cargo build --all-targets --locked
# Integration tests create namespaces and start daemons; keep parallelism modest on small machines.
cargo test --all-targets --locked -- --test-threads "${TEST_THREADS:-2}"
