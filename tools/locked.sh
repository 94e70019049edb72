#!/usr/bin/env bash
# locked.sh LOCKFILE CMD...: runs CMD holding LOCKFILE (so concurrent builds in one checkout do not
# clobber each other's objects); runs it unlocked where util-linux's flock is missing.
lock="$1"; shift
if command -v flock >/dev/null 2>&1; then exec flock "$lock" "$@"; fi
exec "$@"
