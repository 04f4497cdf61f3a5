#!/usr/bin/env bash
# The tests run a real PostgreSQL behind their Supabase stand-in (tests/postgres.py starts a throwaway cluster).
# Debian's package provides it; install it where it is missing (root: apt-get; otherwise say what to run).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL is not installed and this user cannot install it: run 'sudo apt-get install postgresql'" >&2
  exit 1
fi
echo "installing PostgreSQL (Debian's postgresql package) for the tests"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb
