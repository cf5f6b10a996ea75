#!/usr/bin/env bash
# The test command README.md gives: installs prerequisites, then runs every test (unit, property,
# integration against real etcd / BIRD / GoBGP / FRR / kernel in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
scripts/install-deps.sh
scripts/validate-manifests.sh  # deploy/ manifests: kubernetes-validate --strict + yamllint
# Benchmarks are built (so they cannot rot) but not run: they are measurements, not tests.
cargo build --all-targets --locked
scripts/fuzz.sh  # bgp::wire decoder fuzzing, bounded (FUZZ_SECONDS, default 60)
# Integration tests create namespaces and start daemons; keep parallelism modest on small machines.
cargo test --lib --bins --tests --locked -- --test-threads "${TEST_THREADS:-2}"
