#!/bin/bash
# One watcher tick, as cron, the systemd timer or scrontab run it.
#   mpistyle-watch-tick.sh [extra Hydra overrides]
# Reads settings from /etc/mpistyle/watch.env (or $MPISTYLE_WATCH_ENV): the storage URLs, the
# names of the credential variables and their values, the runner. Ticks on one host never
# overlap (flock); ticks on several hosts are safe anyway (claims are conditional writes).
#
# A tick never runs for ever: it is stopped after MPISTYLE_WATCH_TIMEOUT_S (default 8 h, more
# than the watcher's tick_time_limit_s + job_time_limit_s + job_kill_grace_s, 1 h + 6 h + 1 min
# by default: a tick starts no video after its own limit and runs at most one job per video).
# A local job the tick waited for runs on in its own session; the next tick follows
# it. The running tick writes its start into the lock file; a tick that finds the lock held for
# longer than MPISTYLE_WATCH_STALE_S (default: the timeout + 10 min) fails loudly instead of
# quietly stepping aside, so a wedged tick (a hung filesystem no signal can stop) shows.
#
# Exit codes: mpistyle-watch's own (0 fine, 2 bad configuration, 9 storage or scheduler trouble,
# retried next tick), and
#   0    another tick is still running, for less than MPISTYLE_WATCH_STALE_S: nothing to do
#   75   another tick has held the lock for longer than MPISTYLE_WATCH_STALE_S: it is wedged;
#        read its log, then stop it (fuser -v the lock file shows it)
#   124  this tick ran past MPISTYLE_WATCH_TIMEOUT_S and was stopped (137 if it ignored SIGTERM for a
#        minute and was killed)
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
timeout_s=${MPISTYLE_WATCH_TIMEOUT_S:-28800}
stale_s=${MPISTYLE_WATCH_STALE_S:-$((timeout_s + 600))}

exec 9>>"$lock"
if ! flock --nonblock 9; then
  started=$(stat -c %Y "$lock")
  held=$(($(date +%s) - started))
  if [ "$held" -gt "$stale_s" ]; then
    echo "mpistyle-watch-tick: the tick started $(date -d "@$started" '+%F %T') has held $lock for $held s," \
      "more than MPISTYLE_WATCH_STALE_S=$stale_s: it is wedged; read its log, then stop it (fuser -v $lock)" >&2
    exit 75
  fi
  exit 0  # another tick is at work
fi
# The lock file's time is this tick's start (what the check above reads); its text is for people.
echo "tick started $(date '+%F %T') by process $$ on $(hostname)" >"$lock"

status=0
# The watcher's jobs do not inherit the lock (Python closes other descriptors in children).
# shellcheck disable=SC2086  # MPISTYLE_WATCH_ARGS holds several overrides on purpose
timeout --kill-after=60 "$timeout_s" "$watch" ${MPISTYLE_WATCH_ARGS:-} "$@" || status=$?
if [ "$status" = 124 ]; then
  echo "mpistyle-watch-tick: the tick ran past MPISTYLE_WATCH_TIMEOUT_S=$timeout_s s and was stopped" >&2
fi
exit "$status"
