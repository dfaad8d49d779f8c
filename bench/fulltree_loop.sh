#!/usr/bin/env bash
# The "full-tree loop" baseline, as people write it by hand: inotifywait -r -m on the source, and on
# any change one `rsync -a --delete` of the whole tree. Events that arrive while rsync runs are
# coalesced: they queue up in the pipe, and the next run covers all of them.
#
# Usage: fulltree_loop.sh SRC DEST RSH READY_FILE
#   RSH is the rsync -e value (ssh with the benchmark's common options and ControlPath);
#   READY_FILE is created once the watches are up and the first full sync is done.
set -u
src=$1 dest=$2 rsh=$3 ready=$4

# Only change events: the default (all events) would include rsync's own reads of the source
# (OPEN/ACCESS/CLOSE_NOWRITE) and loop forever.
coproc IW { exec inotifywait -r -m -e close_write,create,delete,move,attrib --format '%e %w%f' "$src" 2>&1; }

# The watches must be in place before the first sync, or a change made meanwhile is missed.
while read -r -u "${IW[0]}" line; do
  [[ $line == "Watches established." ]] && break
done

sync_all() { rsync -a --delete -e "$rsh" "$src/" "$dest"; }

sync_all
: >"$ready"

while read -r -u "${IW[0]}" _; do
  # Drain everything already queued: one rsync covers it all.
  while read -r -t 0.001 -u "${IW[0]}" _; do :; done
  sync_all
done
