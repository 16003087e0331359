#!/bin/bash
# One watcher tick, as cron, the systemd timer or scrontab run it.
#   mpistyle-watch-tick.sh [extra Hydra overrides]
# Reads settings from /etc/mpistyle/watch.env (or $MPISTYLE_WATCH_ENV): the storage URLs, the
# names of the credential variables and their values, the runner. Ticks on one host never
# overlap (flock); ticks on several hosts are safe anyway (claims are conditional writes).
set -euo pipefail

env_file=${MPISTYLE_WATCH_ENV:-/etc/mpistyle/watch.env}
if [ -r "$env_file" ]; then
  set -a
  # shellcheck source=/dev/null
  . "$env_file"
  set +a
fi
watch=${MPISTYLE_WATCH:-mpistyle-watch}
lock=${MPISTYLE_WATCH_LOCK:-/tmp/mpistyle-watch.lock}

# shellcheck disable=SC2086  # MPISTYLE_WATCH_ARGS holds several overrides on purpose
exec flock --nonblock --conflict-exit-code 0 "$lock" "$watch" ${MPISTYLE_WATCH_ARGS:-} "$@"
